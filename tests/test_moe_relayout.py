"""A checkpoint of an MoE run moves between ep x tp, one process and ep x pp exactly: DCP
reshards the experts (Shard(0) over ep) and the tp-replicated router and shared experts through
their DTensor placements, the routing bias included."""

from __future__ import annotations

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect

MOE = {
    "model__preset": "tiny-moe",
    "model__moe_bias_update_rate": "1e-3",
    "model__tie_embeddings": "false",  # for the pipelined leg
}
LEGS = [
    (4, {"parallel__dp_shard": 2, "parallel__ep": 2, "parallel__tp": 2}),
    (1, {}),
    (4, {"parallel__dp_shard": 2, "parallel__ep": 2, "parallel__pp": 2}),
]


@pytest.mark.slow
def test_checkpoint_relayout_between_ep_tp_one_process_and_ep_pp(byte_data, tmp_path):
    """Save under ep=2 x tp=2 (world 4), resume in one process, then under ep=2 x pp=2: every
    step's loss, the final weights and the routing bias equal one uninterrupted single-process
    run."""
    common = {
        **MOE,
        "train__steps": 6,
        "checkpoint__dir": str(tmp_path / "ckpt"),
        "checkpoint__interval": 2,
        "train__exit_after_steps": 2,
        "train__micro_batch": 2,
    }
    ref = train_collect(
        0, 1, byte_data, str(tmp_path / "ref"), {**MOE, "train__steps": 6, "train__micro_batch": 2}
    )
    losses: dict = {}
    for world, degrees in LEGS:
        run_dir = str(tmp_path / "run")
        if world == 1:
            out = [train_collect(0, 1, byte_data, run_dir, common)]
        else:
            out = run_workers(train_collect, world, byte_data, run_dir, {**common, **degrees})
        assert len(out[0]["losses"]) == 2
        losses.update(out[0]["losses"])
    # Each pipeline rank returns its own stages' parameters; together the whole model.
    params = {k: v for r in out for k, v in r["params"].items()}
    assert sorted(losses) == list(range(1, 7))
    assert_same_run({"losses": losses, "params": params}, ref)
    bias = [k for k in ref["params"] if k.endswith("expert_bias")]
    assert any(float(ref["params"][k].abs().sum()) > 0 for k in bias)
    for k in bias:
        assert (params[k] == ref["params"][k]).all(), k
