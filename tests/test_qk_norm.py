"""A Qwen3-MoE-shaped model (per-head q/k norms, a head size apart from dim / n_heads, a dense
first block, experts) trains as one process does under expert and pipeline parallelism; tensor
parallelism, which would see only its own heads' norm gradients, is refused in one line."""

from __future__ import annotations

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect
from triaxis.config import validate
from triaxis.errors import UserError

QWEN3_MOE = {
    "model__preset": "tiny-moe",
    "model__qk_norm": "true",
    "model__head_dim": "32",  # tiny: dim 64, 4 heads (16 apart)
    "model__n_shared_experts": "0",
    "model__moe_bias_update_rate": "1e-3",  # also resets the per-rank token counts each step
    "model__tie_embeddings": "false",
    "train__micro_batch": "2",
}
LAYOUTS = {
    "ep2": (2, {"parallel__dp_shard": 2, "parallel__ep": 2}),
    "pp2": (2, {"parallel__pp": 2}),
}
_ref: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_qwen3_moe_shape_trains_as_one_process(layout, byte_data, tmp_path):
    if not _ref:
        _ref.update(train_collect(0, 1, byte_data, str(tmp_path / "ref"), QWEN3_MOE))
        assert _ref["params"]["layers.1.attention.q_norm.weight"].shape == (32,)
    world, degrees = layout
    out = run_workers(
        train_collect, world, byte_data, str(tmp_path / "run"), {**QWEN3_MOE, **degrees}
    )
    got = out[0]
    if world > 1 and "parallel__pp" in degrees:  # the last stage's parameters come from rank 1
        got = {**got, "params": {**out[0]["params"], **out[1]["params"]}}
    assert_same_run(got, _ref)


def test_qk_norm_with_tp_is_refused():
    from tests.parity import make_config
    from triaxis.model.presets import build_model_args
    from triaxis.parallel.dims import ParallelDims

    cfg = make_config("unused", "unused", model__qk_norm="true", parallel__tp=2)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=2, pp=1, world_size=2)
    with pytest.raises(
        UserError, match=r"model.qk_norm=true with parallel.tp=2: .* use parallel.tp=1"
    ):
        validate(cfg, build_model_args(cfg.model, 512), dims)
