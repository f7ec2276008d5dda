"""The cost model against published training throughputs (triaxis/plan/data/published.toml).

Every row is predicted from its published setup with the one calibration in hardware.toml;
the predicted TFLOP/s per GPU (Megatron convention: recomputed forward counted) must be within
15% of the published figure. A row marked `status = "unreproduced"` is expected to miss, with
the reason beside it in the data file; it fails here if it starts to pass (strict xfail), so
the mark cannot outlive the problem.
"""

from __future__ import annotations

import pytest

from triaxis.plan.evidence import load_rows, predict_row, traffic_bound_tflops

ROWS = load_rows()
TOLERANCE = 0.15

# A row states its setup and sources, never a tuning knob: no per-row fudge factor can hide here.
ALLOWED_KEYS = {
    "name",
    "source",
    "published_tflops",
    "dim",
    "n_layers",
    "n_heads",
    "vocab_size",
    "seq_len",
    "gpus",
    "global_batch",
    "tp",
    "pp",
    "micro_batch",
    "schedule",
    "virtual_stages",
    "cluster",
    "runtime",
    "dp_overlap",
    "checkpoint_offload",
    "assumptions",
    "status",
}


def _param(row):
    marks = []
    if row.get("status") == "unreproduced":
        marks.append(
            pytest.mark.xfail(
                strict=True,
                reason="see the row's comment in "
                "published.toml: network-bound without checkpoint "
                "offloading, compute-bound above it with",
            )
        )
    return pytest.param(row, id=row["name"], marks=marks)


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_predicted_tflops_within_15_percent(row):
    p = predict_row(row)
    assert abs(p.error) <= TOLERANCE, (
        f"{row['name']}: predicted {p.predicted_tflops:.1f} TFLOP/s per GPU vs published "
        f"{row['published_tflops']:.0f} ({p.error:+.1%}) with {p.plan.layout.describe()}"
    )


def test_rows_carry_setups_not_knobs():
    for row in ROWS:
        assert set(row) <= ALLOWED_KEYS, f"{row['name']}: unexpected keys {set(row) - ALLOWED_KEYS}"
        assert row["source"] and row["assumptions"]


def test_megatron_rows_use_their_published_layout():
    for row in ROWS:
        if row["runtime"] != "megatron-2021":
            continue
        a = predict_row(row).plan.layout
        assert (a.tp, a.pp, a.micro_batch, a.world_size) == (
            row["tp"],
            row["pp"],
            row["micro_batch"],
            row["gpus"],
        )
        assert a.activation_checkpoint == "full"


def test_unreproduced_rows_are_bracketed_by_network_and_compute():
    """Why the MiCS row is marked (published.toml): keeping its checkpoints on the GPU, the
    network caps it below the published figure, and the model respects that cap; offloading them
    as published, the prediction is compute-bound and above the published figure by more than
    the tolerance. Either reading misses, so no choice of the unstated micro-batch rescues it."""
    for row in ROWS:
        if row.get("status") != "unreproduced":
            continue
        bound = traffic_bound_tflops(row)
        kept = predict_row({**row, "checkpoint_offload": False})
        assert kept.predicted_tflops <= bound * 1.01 < row["published_tflops"]
        offloaded = predict_row(row)
        assert offloaded.plan.layout.offload_checkpoints
        assert offloaded.error > TOLERANCE
        t = offloaded.plan.time
        assert sum(t.exposed_comm.values()) < 0.01 * t.total
