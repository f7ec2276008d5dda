"""MoE blocks under train.compile: the expert matmuls compile where torch's traced grouped
matmul admits the dtype (bf16) and run eagerly between graphs elsewhere (fp32 on CPU: its
fake-tensor rule refuses what its CPU kernel computes), and the run equals the uncompiled one."""

from __future__ import annotations

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect

MOE = {
    "model__preset": "tiny-moe",
    "model__moe_bias_update_rate": "1e-2",
    "train__micro_batch": 2,
}
COMPILE = {"train__compile": "true", "train__compile_backend": "aot_eager"}


def _compiled(rank: int, world: int, data: str, run_dir: str, overrides: dict) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = train_collect(rank, world, data, run_dir, overrides)
    out["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [{}, {"parallel__ep": 2, "parallel__dp_shard": 2}], ids=["w1", "ep2"]
)
def test_compiled_moe_matches_eager(layout, byte_data, tmp_path):
    world = 2 if layout else 1
    ref = run_workers(train_collect, world, byte_data, str(tmp_path / "ref"), {**MOE, **layout})
    got = run_workers(
        _compiled, world, byte_data, str(tmp_path / "got"), {**MOE, **layout, **COMPILE}
    )
    assert_same_run(got[0], ref[0])
    assert all(g["graphs"] > 0 for g in got)  # compiled, not an eager fallback
