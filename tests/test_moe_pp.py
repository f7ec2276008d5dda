"""MoE blocks inside pipeline stages: the aux loss's gradient (scaled by the schedule as the
loss is), the balancing counts (per stage, summed over dp) and the routing bias train as one
process does, 5 steps; losses and parameters 1e-5, the bias bit-equal."""

from __future__ import annotations

import json

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect

MOE = {
    "model__preset": "tiny-moe",
    "model__moe_bias_update_rate": "1e-3",
    "model__tie_embeddings": "false",
}

# (world, degrees, micro-batch); 8 / micro-batch micro-batches per step.
LAYOUTS = {
    "pp2_1f1b": (2, {"parallel__pp": 2, "parallel__pp_schedule": "1f1b"}, 2),
    "pp2_gpipe": (2, {"parallel__pp": 2, "parallel__pp_schedule": "gpipe"}, 2),
    "pp2_interleaved_capacity": (
        2,
        {
            "parallel__pp": 2,
            "parallel__pp_schedule": "interleaved-1f1b",
            "parallel__pp_virtual_stages": 2,
            "model__moe_capacity_factor": "1.0",
        },
        2,
    ),
    "pp2_zbv": (
        2,
        {"parallel__pp": 2, "parallel__pp_schedule": "zbv", "parallel__pp_virtual_stages": 2},
        2,
    ),
    "ep2_pp2": (
        4,
        {"parallel__pp": 2, "parallel__dp_shard": 2, "parallel__ep": 2},
        2,
    ),
    "tp2_pp2": (4, {"parallel__pp": 2, "parallel__tp": 2}, 2),
}

_refs: dict = {}


def _reference(data, tmp_path_factory, micro: int, extra: dict) -> tuple[dict, list]:
    key = (micro, tuple(sorted(extra.items())))
    if key not in _refs:
        run_dir = tmp_path_factory.mktemp("ref")
        out = train_collect(0, 1, data, str(run_dir), {"train__micro_batch": micro, **extra})
        _refs[key] = out, _moe_metrics(run_dir)
    return _refs[key]


def _moe_metrics(run_dir) -> list[dict]:
    """Each logged step's moe_* figures (per block, from every stage's ranks)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k.startswith("moe_")} for x in lines]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_in_pipeline_stages_matches_single_process(
    layout, byte_data, tmp_path, tmp_path_factory
):
    world, degrees, micro = LAYOUTS[layout]
    model = {k: v for k, v in degrees.items() if k.startswith("model__")}
    got = run_workers(
        train_collect,
        world,
        byte_data,
        str(tmp_path),
        {**MOE, **degrees, "train__micro_batch": micro},
    )
    # Each pipeline rank returns its own stages' parameters; together the whole model.
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:
        assert r["losses"] == got[0]["losses"]
        merged["params"].update(r["params"])
    ref, ref_metrics = _reference(byte_data, tmp_path_factory, micro, {**MOE, **model})
    bias = [k for k in ref["params"] if k.endswith("expert_bias")]
    assert bias and all(float(ref["params"][k].abs().sum()) > 0 for k in bias)
    assert_same_run(merged, ref)
    for k in bias:
        assert (merged["params"][k] == ref["params"][k]).all(), k
    # The metrics hold every MoE block (3 of them: block 0 is dense), whichever stage has it.
    metrics = _moe_metrics(tmp_path)
    assert len(metrics) == len(ref_metrics) == 5
    for got_step, ref_step in zip(metrics, ref_metrics):
        assert set(got_step) == set(ref_step) and "moe_load_max/3" in ref_step
        for k, v in ref_step.items():
            assert got_step[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
