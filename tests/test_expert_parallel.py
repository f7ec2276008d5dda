"""Expert parallelism (parallel.ep) trains the MoE model as one process does: losses, parameters
and the router's balancing state (the same tokens reach the same experts), 5 steps."""

from __future__ import annotations

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect

MOE = {"model__preset": "tiny-moe", "model__moe_bias_update_rate": "1e-3"}

# (world, degrees, single-process extras): ep carved out of dp_shard.
LAYOUTS = {
    "ep2": (2, {"parallel__dp_shard": 2, "parallel__ep": 2}),
    "ep2_capacity": (
        2,
        {"parallel__dp_shard": 2, "parallel__ep": 2, "model__moe_capacity_factor": "1.0"},
    ),
    "ep2_full_ac": (
        2,
        {"parallel__dp_shard": 2, "parallel__ep": 2, "parallel__activation_checkpoint": "full"},
    ),
    # Host gradients on two meshes: their norms meet on the device, one mesh at a time.
    "ep2_cpu_offload": (
        2,
        {"parallel__dp_shard": 2, "parallel__ep": 2, "parallel__cpu_offload": "true"},
    ),
    "ep2_shard4": (4, {"parallel__dp_shard": 4, "parallel__ep": 2}),
    "ep2_replicate2": (
        4,
        {"parallel__dp_replicate": 2, "parallel__dp_shard": 2, "parallel__ep": 2},
    ),
}

_refs: dict = {}


def _reference(data, tmp_path_factory, micro: int, extra: dict) -> dict:
    key = (micro, tuple(sorted(extra.items())))
    if key not in _refs:
        run_dir = str(tmp_path_factory.mktemp("ref"))
        _refs[key] = train_collect(0, 1, data, run_dir, {"train__micro_batch": micro, **extra})
    return _refs[key]


@pytest.mark.parametrize(
    "layout",
    [
        name
        if world == 2 and "capacity" not in name and "offload" not in name
        else pytest.param(name, marks=pytest.mark.slow)
        for name, (world, _) in LAYOUTS.items()
    ],
)
def test_expert_parallel_matches_single_process(layout, byte_data, tmp_path, tmp_path_factory):
    world, degrees = LAYOUTS[layout]
    model = {k: v for k, v in degrees.items() if k.startswith("model__")}
    micro = 8 // (world * 2)  # two micro-batches per step: gradient accumulation too
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
    # Parameters and the routing bias (its moves are signs of the summed per-expert counts).
    assert_same_run(got[0], ref)
    for k in bias:
        assert (got[0]["params"][k] == ref["params"][k]).all(), k


@pytest.mark.parametrize(
    "overrides, world, words",
    [
        (["--parallel.ep=2"], 2, "parallel.ep=2 on a dense model (model.n_experts=0)"),
        (
            ["--model.preset=tiny-moe", "--parallel.ep=3", "--parallel.dp_shard=3"],
            3,
            "parallel.ep=3 does not divide model.n_experts=4",
        ),
        (
            ["--model.preset=tiny-moe", "--parallel.ep=4", "--parallel.dp_shard=2"],
            2,
            "parallel.ep=4 does not divide parallel.dp_shard=2",
        ),
        (
            ["--model.preset=tiny-moe", "--parallel.ep=2", "--parallel.cp=2"],
            4,
            "parallel.ep=2 with parallel.cp=2 is not supported yet",
        ),
    ],
)
def test_bad_ep_is_one_line_before_any_process_group(overrides, world, words):
    import torch.distributed as dist

    from triaxis.config import load_config
    from triaxis.errors import UserError
    from triaxis.model import build_model_args
    from triaxis.parallel.rules import check_layout

    cfg = load_config(None, overrides)
    with pytest.raises(UserError) as err:
        check_layout(cfg, world, build_model_args(cfg.model))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not dist.is_initialized()


def _count_collectives(rank, world, data, run_dir, overrides):
    """One optimizer step's collectives, by op and by the mesh axis of their group."""
    import torch.distributed as dist

    from tests.parity import make_config
    from triaxis.parallel.compat import reduce_scatter_name
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    trainer = Trainer(make_config(data, run_dir, **overrides), init_distributed("cpu"))
    expert_mesh = trainer.dims.build_expert_mesh("cpu")  # same coordinates, new groups
    axes = {tuple(dist.get_process_group_ranks(trainer.mesh["dp_shard"].get_group())): "dp_shard"}
    for name in ("edp", "ep"):
        axes[tuple(dist.get_process_group_ranks(expert_mesh[name].get_group()))] = name
    counts: dict[tuple[str, str], int] = {}
    attrs = {"reduce_scatter": reduce_scatter_name(), "all_to_all_single": "all_to_all_single"}
    originals = {op: getattr(dist, attr) for op, attr in attrs.items()}

    def counting(op):
        def wrapper(*args, group=None, **kwargs):
            key = (op, axes.get(tuple(dist.get_process_group_ranks(group)), "other"))
            counts[key] = counts.get(key, 0) + 1
            return originals[op](*args, group=group, **kwargs)

        return wrapper

    for op, attr in attrs.items():
        setattr(dist, attr, counting(op))
    try:
        trainer.train_step(cursor=0)
    finally:
        for op, attr in attrs.items():
            setattr(dist, attr, originals[op])
    return counts


@pytest.mark.slow
def test_expert_gradients_reduce_over_edp_and_tokens_move_over_ep(byte_data, tmp_path):
    """dp_shard=4, ep=2: ranks {0,1} and {2,3} split the experts, {0,2} and {1,3} hold the same
    ones. Expert gradients are reduce-scattered over edp only (3 MoE blocks), the rest over
    dp_shard (4 blocks + the root); all-to-alls stay inside the ep group: per MoE block and
    micro-batch, counts + rows + rows back forward, and two of rows backward."""
    out = run_workers(
        _count_collectives,
        4,
        byte_data,
        str(tmp_path),
        {**MOE, "parallel__dp_shard": 4, "parallel__ep": 2, "train__micro_batch": 1},
    )
    micro, moe_blocks = 2, 3  # global batch 8 over 4 ranks, micro-batch 1
    for counts in out:
        assert counts[("reduce_scatter", "edp")] == micro * moe_blocks, counts
        assert counts[("reduce_scatter", "dp_shard")] == micro * (4 + 1), counts
        assert counts[("all_to_all_single", "ep")] == micro * moe_blocks * 5, counts
        assert set(counts) == {
            ("reduce_scatter", "edp"),
            ("reduce_scatter", "dp_shard"),
            ("all_to_all_single", "ep"),
        }, counts


@pytest.mark.slow
def test_checkpoint_relayout_across_ep_degrees(byte_data, tmp_path):
    """Save under ep=2, resume under ep=1 (plain dp_shard=2), then ep=2 again: every step's
    loss, the final weights and the routing bias equal one uninterrupted single-process run
    (DCP reshards the experts through their DTensor placements)."""
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
    for ep in (2, 1, 2):
        degrees = {"parallel__dp_shard": 2, "parallel__ep": ep}
        out = run_workers(train_collect, 2, byte_data, str(tmp_path / "run"), {**common, **degrees})
        assert len(out[0]["losses"]) == 2
        losses.update(out[0]["losses"])
    assert sorted(losses) == list(range(1, 7))
    assert_same_run({**out[0], "losses": losses}, ref)
    bias = [k for k in ref["params"] if k.endswith("expert_bias")]
    assert any(float(ref["params"][k].abs().sum()) > 0 for k in bias)
    for k in bias:
        assert (out[0]["params"][k] == ref["params"][k]).all(), k
