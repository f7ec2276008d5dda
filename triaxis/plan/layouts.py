"""The enumeration: every layout of a cluster the search space allows, in families that differ
only in activation checkpointing, offload and resharding (triaxis.plan.search evaluates and
ranks them). The rules are the trainer's own (composition_problem, schedule_problem, the mesh's
divisibility), so the planner never emits a layout the trainer refuses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from triaxis.config import ParallelConfig, composition_problem
from triaxis.parallel.partition import schedule_problem, stages_per_rank
from triaxis.plan.collectives import hierarchical_applies
from triaxis.plan.context import pp_cp_pairs
from triaxis.plan.experts import ep_degrees
from triaxis.plan.problem import AC_POLICIES, SCHEDULES, Layout, ModelShape


@dataclass(frozen=True)
class SearchSpace:
    """Which options the enumeration may use (the CLI's restrictions)."""

    schedules: tuple[str, ...] = SCHEDULES
    ac_policies: tuple[str, ...] = AC_POLICIES
    ac_every: tuple[int, ...] = (2,)
    """Values of ac_every tried with selective checkpointing."""
    allow_offload: bool = True
    allow_no_reshard: bool = True
    max_pp: int = 0
    """0 = up to the number of blocks; 1 = no pipeline (the training runtime today)."""
    max_tp: int = 0
    """0 = up to GPUs per node: tensor parallelism never crosses the NVLink domain."""
    max_cp: int = 1
    """Context-parallel degrees tried: 1 = none (a bare SearchSpace), 0 = up to GPUs per node.
    Only where the sequence splits into 2 x cp chunks; with or without a pipeline."""
    virtual_stages: tuple[int, ...] = (2, 4)
    """Model chunks per rank tried with interleaved-1f1b."""
    max_micro_batch: int = 64


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def valid_tp(shape: ModelShape, tp: int) -> bool:
    return shape.n_heads % tp == 0 and shape.n_kv_heads % tp == 0 and shape.ffn_dim % tp == 0


def enumerate_families(
    shape: ModelShape,
    world: int,
    gpus_per_node: int,
    global_batch: int,
    space: SearchSpace,
    seq_len: int = 0,
) -> Iterator[list[Layout]]:
    """Every layout of `world` ranks the search space allows and the batch divides, grouped in
    families that differ only in activation checkpointing, offload and resharding.

    Rules: tp divides the heads, KV heads and MLP width and stays inside a node; pp <= blocks;
    dp = dp_replicate x dp_shard divides the global batch and micro_batch divides the per-replica
    batch; interleaving needs blocks divisible by pp x virtual stages; schedules need enough
    micro-batches (schedule_fits, the trainer's rule); no pipeline for tied embeddings (the
    trainer refuses it); offload and keeping parameters gathered (no reshard) only
    mean something with dp_shard > 1; cp (space.max_cp) divides `seq_len` into 2 x cp chunks;
    ep (MoE models) divides dp_shard and the experts (plan.experts.ep_degrees).
    """
    max_tp = space.max_tp or gpus_per_node
    max_pp = space.max_pp or shape.n_layers
    if shape.tie_embeddings:
        max_pp = 1  # the embedding (first stage) and the head (last) would be one tensor
    acs = _ac_options(space)
    for tp in divisors(world):
        if tp > max_tp or not valid_tp(shape, tp):
            continue
        for pp, cp in pp_cp_pairs(world // tp, gpus_per_node, space.max_cp, seq_len):
            if pp > min(max_pp, shape.n_layers):
                continue
            dp = world // (tp * pp * cp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            schedules = _schedules(shape, pp, space)
            for dp_shard in divisors(dp):
                sharded = dp_shard * cp > 1  # FSDP shards over dp_shard x cp
                offloads = (False, True) if (space.allow_offload and sharded) else (False,)
                reshards = (False, True) if (space.allow_no_reshard and sharded) else (True,)
                two_phase = cp == 1 and hierarchical_applies(gpus_per_node, dp_shard, tp)
                for mb in divisors(per_replica):
                    if mb > space.max_micro_batch:
                        break
                    for sched, v in schedules:
                        if not schedule_fits(sched, pp, v, per_replica // mb):
                            continue
                        family = [
                            Layout(
                                dp // dp_shard,
                                dp_shard,
                                tp,
                                pp,
                                mb,
                                ac,
                                every,
                                sched,
                                v,
                                off,
                                rs,
                                ckpt_off,
                                cp=cp,
                            )
                            for ac, every in acs
                            for off in offloads
                            for rs in reshards
                            # Block inputs to the host (parallel.activation_offload): full
                            # checkpointing only, where they are all that is kept.
                            for ckpt_off in (
                                (False, True) if ac == "full" and space.allow_offload else (False,)
                            )
                        ]
                        if two_phase:  # the same layouts with MiCS hierarchical gathers
                            family += [dataclasses.replace(x, hierarchical=True) for x in family]
                        # Each expert-parallel degree is a family of its own: ep trades the
                        # experts' memory and gathers for all-to-all, neither side dominates.
                        for ep in ep_degrees(shape, dp_shard, cp):
                            yield [y for x in family if composes(y := _with_ep(x, ep))]


def _with_ep(layout: Layout, ep: int) -> Layout:
    # No copy for the usual ep = 1: dataclasses.replace re-validates, once per layout searched.
    return layout if layout.ep == ep else dataclasses.replace(layout, ep=ep)


def enumerate_layouts(*args, **kwargs) -> Iterator[Layout]:
    """enumerate_families' layouts one at a time (the same arguments)."""
    for family in enumerate_families(*args, **kwargs):
        yield from family


def recompute_rank(layout: Layout) -> float:
    """Fraction of blocks recomputed: 0 (none), 1/k (every k-th), 1 (full)."""
    return {"none": 0.0, "full": 1.0}.get(layout.activation_checkpoint, 1 / layout.ac_every)


def recomputes_no_less(a: Layout, b: Layout) -> bool:
    """Does `a` recompute at least what `b` does? Op-level (every block's cheap ops) sits
    between none and full, and is not comparable with every k-th block (which costs more
    depends on the sequence length)."""
    ops = (a.activation_checkpoint == "op", b.activation_checkpoint == "op")
    if ops == (True, True):
        return True
    if ops[0]:
        return b.activation_checkpoint == "none"
    if ops[1]:
        return a.activation_checkpoint == "full"
    return recompute_rank(a) >= recompute_rank(b)


def slower_or_equal(a: Layout, b: Layout) -> bool:
    """Within a family, is `a` at least as slow as `b` in every option (more recomputation,
    offload, resharding)? Then a fitting `b` makes `a` pointless for speed."""
    return (
        recomputes_no_less(a, b)
        and a.offload_checkpoints >= b.offload_checkpoints
        and a.cpu_offload >= b.cpu_offload
        and a.reshard_after_forward >= b.reshard_after_forward
        and a.hierarchical == b.hierarchical  # either may be the faster: both are timed
    )


def composes(layout: Layout) -> bool:
    """The trainer's rule for options that cannot run together (config.composition_problem,
    raised by check_layout): the planner never emits a layout it refuses."""
    return _composes(
        layout.dp_replicate,
        layout.dp_shard,
        layout.pp,
        layout.cp,
        layout.ep,
        layout.schedule if layout.pp > 1 else ParallelConfig.pp_schedule,
        layout.reshard_after_forward,
        tuple(layout.runtime_ac().items()),
    )


@functools.lru_cache(maxsize=1 << 14)
def _composes(dp_replicate, dp_shard, pp, cp, ep, schedule, reshard, ac) -> bool:
    # Cached: a search asks this of every layout, and a plan's layouts share few of these keys
    # (building and checking a ParallelConfig was a sixth of a 1,024-GPU plan's time).
    p = ParallelConfig(
        dp_replicate=dp_replicate,
        dp_shard=dp_shard,
        pp=pp,
        cp=cp,
        ep=ep,
        pp_schedule=schedule,
        reshard_after_forward=reshard,
        **dict(ac),
    )
    return composition_problem(p, fsdp=dp_replicate * dp_shard * cp > 1) is None


def schedule_fits(schedule: str, pp: int, virtual_stages: int, num_micro: int) -> bool:
    """The trainer's own rule (`parallel.partition.schedule_problem`): enough micro-batches for
    the schedule (1f1b and the interleaved ones at least pp, interleaving a multiple of pp, zbv
    2·pp), the stages per rank it runs. One rule, so the planner never picks what the trainer
    refuses."""
    return pp == 1 or schedule_problem(schedule, pp, virtual_stages, num_micro) is None


def _schedules(shape: ModelShape, pp: int, space: SearchSpace) -> list[tuple[str, int]]:
    """(schedule, stages per rank) pairs for pp ranks: interleaved-1f1b with each of the
    space's virtual stages that divide the blocks evenly, the other schedules with the stages
    per rank the runtime runs them with (zbv and interleaved-zb: 2). Every stage needs a block."""
    if pp == 1:
        return [("none", 1)]
    out = []
    for s in space.schedules:
        if s == "interleaved-1f1b":
            out += [(s, v) for v in space.virtual_stages if shape.n_layers % (pp * v) == 0]
        elif pp * stages_per_rank(s, 1) <= shape.n_layers:
            out.append((s, stages_per_rank(s, 1)))
    return out


def _ac_options(space: SearchSpace) -> list[tuple[str, int]]:
    out = []
    for ac in space.ac_policies:
        if ac == "selective":
            out += [(ac, k) for k in space.ac_every]
        else:
            out.append((ac, 2))
    return out
