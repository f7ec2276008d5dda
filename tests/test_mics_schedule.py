"""MiCS two-hop gradient sync, proven by counting collectives per mesh axis, and the per-rank
memory of sharded model states."""

import pytest
import torch.distributed as dist

from tests.dist import run_workers
from tests.parity import local_state_bytes, make_config
from triaxis.parallel.compat import all_gather_name, reduce_scatter_name


def _count_collectives(rank, world, data, run_dir, overrides):
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    trainer = Trainer(make_config(data, run_dir, **overrides), init_distributed("cpu"))
    axes = {}
    axes[tuple(dist.get_process_group_ranks(trainer.dp_group))] = "dp"
    for name in ("dp_replicate", "dp_shard"):  # the named axes win over the flattened dp
        axes[tuple(dist.get_process_group_ranks(trainer.mesh[name].get_group()))] = name
    counts: dict[tuple[str, str], int] = {}
    originals = {}

    def counting(op):
        def wrapper(*args, group=None, **kwargs):
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else "world"
            key = (op, axes.get(ranks, str(ranks)))
            counts[key] = counts.get(key, 0) + 1
            return originals[op](*args, group=group, **kwargs)

        return wrapper

    # Counted under 2.13's names, patched under the ones this torch's FSDP calls.
    attrs = {
        "reduce_scatter_single": reduce_scatter_name(),
        "all_reduce": "all_reduce",
        "all_gather_single": all_gather_name(),
    }
    for op, attr in attrs.items():
        originals[op] = getattr(dist, attr)
        setattr(dist, attr, counting(op))
    try:
        trainer.train_step(cursor=0)  # exactly one optimizer step = one accumulation cycle
    finally:
        for op, fn in originals.items():
            setattr(dist, attrs[op], fn)
    # FSDP groups on this rank: one per block, plus one root per model (or per pipeline stage).
    roots = len(trainer.pipeline.stages) if trainer.pipeline is not None else 1
    return {
        "counts": counts,
        "groups": len(trainer.model.layers) + roots,
        "accum": trainer.grad_accum,
    }


@pytest.mark.parametrize("accum", [1, 3])
def test_two_hop_sync_hsdp(accum, byte_data, tmp_path):
    """dp_replicate=2 x dp_shard=2: reduce-scatter in the partition group every micro-batch,
    all-reduce across groups once per cycle, for every FSDP group (blocks + root)."""
    out = run_workers(
        _count_collectives,
        4,
        byte_data,
        str(tmp_path),
        {
            "parallel__dp_replicate": 2,
            "parallel__dp_shard": 2,
            "train__micro_batch": 1,
            "train__global_batch": 4 * accum,
        },
    )
    for r in out:
        c, groups = r["counts"], r["groups"]
        assert r["accum"] == accum
        assert c[("reduce_scatter_single", "dp_shard")] == accum * groups
        assert c[("all_reduce", "dp_replicate")] == groups
        # Parameters are gathered inside the partition group only, never across replicas.
        assert c[("all_gather_single", "dp_shard")] >= accum * groups
        assert not any(axis == "dp_replicate" for (op, axis) in c if op != "all_reduce")


def test_plain_dp_syncs_once_per_cycle(byte_data, tmp_path):
    """dp_shard=1: no communication until the last micro-batch, then one all-reduce per group."""
    out = run_workers(
        _count_collectives,
        2,
        byte_data,
        str(tmp_path),
        {
            "parallel__dp_replicate": 2,
            "parallel__dp_shard": 1,
            "train__micro_batch": 1,
            "train__global_batch": 6,
        },
    )
    for r in out:
        c = r["counts"]
        assert r["accum"] == 3
        assert c[("all_reduce", "dp_replicate")] == r["groups"]
        assert c.get(("reduce_scatter_single", "dp_shard"), 0) == 0


def _state_bytes(rank, world, data, run_dir, overrides):
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    trainer = Trainer(
        make_config(data, run_dir, **{**overrides, "train__steps": 1}), init_distributed("cpu")
    )
    trainer.fit()
    return local_state_bytes(trainer)


@pytest.mark.parametrize(
    "world,degrees,factor",
    [
        (2, {"parallel__dp_shard": 2}, 2),
        *[
            pytest.param(*case, marks=pytest.mark.slow)  # world 4: 10-20 s each under load
            for case in [
                (4, {"parallel__dp_shard": 4}, 4),
                (4, {"parallel__dp_replicate": 2, "parallel__dp_shard": 2}, 2),
                (4, {"parallel__tp": 2, "parallel__dp_shard": 2}, 4),
            ]
        ],
    ],
)
def test_state_bytes_shrink_by_shard_degree(world, degrees, factor, byte_data, tmp_path):
    """Parameters + optimizer state per rank = single-process bytes / shard degree, within 5%
    (FSDP pads each parameter's dim 0 to a multiple of the degree; TP replicates the norms)."""
    ref = run_workers(_state_bytes, 1, byte_data, str(tmp_path / "ref"), {"train__micro_batch": 8})[
        0
    ]
    got = run_workers(
        _state_bytes,
        world,
        byte_data,
        str(tmp_path / "run"),
        {**degrees, "train__micro_batch": 8 * degrees.get("parallel__tp", 1) // world},
    )
    total_ref = ref["params"] + ref["optim"]
    assert ref["optim"] == 2 * ref["params"]  # AdamW: exp_avg + exp_avg_sq
    for r in got:
        ratio = (r["params"] + r["optim"]) / total_ref
        assert abs(ratio * factor - 1) <= 0.05, f"rank holds {ratio:.3f} of the state"


def test_two_hop_sync_with_pipelining(byte_data, tmp_path):
    """pp 2 x dp_replicate 2 x dp_shard 2: the pipeline accumulates over its micro-batches, then
    each stage's FSDP groups run both hops once: reduce-scatter in the partition group, then
    all-reduce across groups; nothing crosses replicas but that all-reduce."""
    out = run_workers(
        _count_collectives,
        8,
        byte_data,
        str(tmp_path),
        {
            "parallel__pp": 2,
            "parallel__dp_replicate": 2,
            "parallel__dp_shard": 2,
            "model__tie_embeddings": "false",
            "train__micro_batch": 1,
            "train__global_batch": 8,
        },
    )
    for r in out:
        c, groups = r["counts"], r["groups"]
        assert r["accum"] == 2
        assert c[("reduce_scatter_single", "dp_shard")] == groups
        assert c[("all_reduce", "dp_replicate")] == groups
        assert not any(axis == "dp_replicate" for (op, axis) in c if op != "all_reduce")
