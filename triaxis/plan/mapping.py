"""A planned layout as the trainer's [parallel] section: the one mapping `triaxis plan`'s TOML
snippet and parallel.auto both use, so the trainer runs exactly what the plan printed."""

from __future__ import annotations

import dataclasses

from triaxis.config import ParallelConfig
from triaxis.parallel.partition import V_SCHEDULES
from triaxis.plan.memory import stage_blocks
from triaxis.plan.problem import Layout


def stage_split(n_layers: int, layout: Layout) -> tuple[int, ...]:
    """Blocks of each pipeline stage, in the runtime's stage order (parallel.pp_layers): each
    rank holds the blocks the cost model gives it (memory.stage_blocks), split as evenly as
    possible over its stages; rank r holds stages r, r + pp, ... (V schedules: r and
    2·pp - 1 - r, triaxis.parallel.partition.stage_rank)."""
    pp, v = layout.pp, layout.virtual_stages
    counts = [0] * (pp * v)
    for r, blocks in enumerate(stage_blocks(n_layers, pp)):
        base, extra = divmod(blocks, v)
        for j in range(v):
            s = (r if j == 0 else 2 * pp - 1 - r) if layout.schedule in V_SCHEDULES else j * pp + r
            counts[s] = base + (1 if j < extra else 0)
    return tuple(counts)


def parallel_config(
    layout: Layout, n_layers: int, base: ParallelConfig | None = None
) -> ParallelConfig:
    """The trainer's [parallel] section that runs `layout` exactly (degrees, schedule, stages per
    rank, the stage split, checkpointing, offload): a new ParallelConfig over `base` (its other
    fields kept). The one mapping `triaxis plan`'s snippet and parallel.auto both use; the
    micro-batch is train.micro_batch = layout.micro_batch."""
    piped = layout.pp > 1
    return dataclasses.replace(
        base or ParallelConfig(),
        dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard,
        tp=layout.tp,
        pp=layout.pp,
        cp=layout.cp,
        ep=layout.ep,
        pp_schedule=layout.schedule if piped else (base or ParallelConfig()).pp_schedule,
        pp_virtual_stages=layout.virtual_stages if piped else 1,
        pp_layers=",".join(map(str, stage_split(n_layers, layout))) if piped else "",
        **layout.runtime_ac(),
        cpu_offload=layout.cpu_offload,
        reshard_after_forward=layout.reshard_after_forward,
        loss_parallel=layout.tp > 1,
        hierarchical="on" if layout.hierarchical else "off",
    )
