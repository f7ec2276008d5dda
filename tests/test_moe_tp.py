"""MoE blocks under tensor (+ sequence) parallelism: replicated on the tp group, the tokens
gathered on the sequence at the block's input and sliced back at its output
(parallelize.moe_tp_plan). Losses, parameters and the routing bias equal one process's, 5 steps."""

from __future__ import annotations

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect

MOE = {"model__preset": "tiny-moe", "model__moe_bias_update_rate": "1e-3"}

# (world, degrees, micro-batch): the single-process reference runs the same micro-batch, so
# every MoE forward sees the same tokens (capacity and aux loss are per micro-batch).
LAYOUTS = {
    "tp2": (2, {"parallel__tp": 2}, 2),
    "tp2_capacity": (2, {"parallel__tp": 2, "model__moe_capacity_factor": "1.0"}, 2),
    "tp2_full_ac": (2, {"parallel__tp": 2, "parallel__activation_checkpoint": "full"}, 2),
    "ep2_tp2": (4, {"parallel__dp_shard": 2, "parallel__ep": 2, "parallel__tp": 2}, 2),
    "ep2_tp2_capacity": (
        4,
        {
            "parallel__dp_shard": 2,
            "parallel__ep": 2,
            "parallel__tp": 2,
            "model__moe_capacity_factor": "1.0",
        },
        2,
    ),
}

_refs: dict = {}


def _reference(data, tmp_path_factory, micro: int, extra: dict) -> dict:
    key = (micro, tuple(sorted(extra.items())))
    if key not in _refs:
        run_dir = str(tmp_path_factory.mktemp("ref"))
        _refs[key] = train_collect(0, 1, data, run_dir, {"train__micro_batch": micro, **extra})
    return _refs[key]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_under_tp_matches_single_process(layout, byte_data, tmp_path, tmp_path_factory):
    world, degrees, micro = LAYOUTS[layout]
    model = {k: v for k, v in degrees.items() if k.startswith("model__")}
    got = run_workers(
        train_collect,
        world,
        byte_data,
        str(tmp_path),
        {**MOE, **degrees, "train__micro_batch": micro},
    )
    ref = _reference(byte_data, tmp_path_factory, micro, {**MOE, **model})
    bias = [k for k in ref["params"] if k.endswith("expert_bias")]
    assert bias and any(float(ref["params"][k].abs().sum()) > 0 for k in bias)
    assert_same_run(got[0], ref)
    for k in bias:
        assert (got[0]["params"][k] == ref["params"][k]).all(), k


def test_moe_tp_and_pp_layouts_pass_the_rules():
    """MoE with tp and pp now passes check_layout (both used to be refused in one line)."""
    from triaxis.config import load_config
    from triaxis.model import build_model_args
    from triaxis.parallel.rules import check_layout

    overrides = ["--model.preset=tiny-moe", "--model.tie_embeddings=false"]
    for degrees, world in (
        (["--parallel.tp=2", "--parallel.ep=2", "--train.micro_batch=1"], 8),
        (["--parallel.pp=2", "--parallel.tp=2", "--parallel.ep=2", "--train.micro_batch=1"], 8),
    ):
        cfg = load_config(None, overrides + degrees)
        dims = check_layout(cfg, world, build_model_args(cfg.model))
        assert (dims.tp, dims.ep) == (2, 2)


def test_lora_on_an_moe_linear_under_tp_is_one_line():
    """The MoE block's linears are replicated on tp; LoRA places adapters on tp-sharded ones."""
    from triaxis.config import load_config
    from triaxis.errors import UserError
    from triaxis.model import build_model_args
    from triaxis.parallel.rules import check_layout

    overrides = ["--model.preset=tiny-moe", "--lora.enabled=true", "--parallel.tp=2"]
    cfg = load_config(None, [*overrides, "--lora.targets=shared.w1"])
    with pytest.raises(UserError) as err:
        check_layout(cfg, 2, build_model_args(cfg.model))
    assert "adapts layers.1.feed_forward.shared.w1, a linear of an MoE block" in str(err.value)
    assert "\n" not in str(err.value)
    cfg = load_config(None, [*overrides, "--lora.targets=attention.wq"])
    check_layout(cfg, 2, build_model_args(cfg.model))  # the attention's linears are sharded


def _tp_collectives(rank, world, data, run_dir, first_dense: int) -> dict[str, int]:
    """One step's DTensor collectives (one micro-batch), by op."""
    from torch.distributed.tensor.debug import CommDebugMode

    from tests.parity import make_config
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = make_config(
        data,
        run_dir,
        **MOE,
        parallel__tp=2,
        train__micro_batch=8,
        model__moe_first_dense=first_dense,
    )
    trainer = Trainer(cfg, init_distributed("cpu"))
    with CommDebugMode() as comm:
        trainer.train_step(cursor=0)
    return {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}


@pytest.mark.slow
def test_an_moe_block_under_tp_gathers_like_the_dense_mlp_and_reduces_nothing(byte_data, tmp_path):
    """The dense MLP under sequence parallelism: an all-gather and a reduce-scatter forward,
    the same pair backward. The replicated MoE block: the input's all-gather forward, the
    output gradient's backward, no reduce-scatter (its output is sliced, its input gradient
    complete). Three MoE blocks against one: two blocks' worth, 2 reduce-scatters each."""
    moe3 = run_workers(_tp_collectives, 2, byte_data, str(tmp_path / "a"), 1)[0]
    moe1 = run_workers(_tp_collectives, 2, byte_data, str(tmp_path / "b"), 3)[0]
    assert moe1["reduce_scatter_tensor"] - moe3["reduce_scatter_tensor"] == 2 * 2, (moe1, moe3)
    assert moe1["all_gather_into_tensor"] == moe3["all_gather_into_tensor"], (moe1, moe3)
    assert moe1.get("all_reduce", 0) == moe3.get("all_reduce", 0), (moe1, moe3)
