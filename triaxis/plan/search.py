"""The search: enumerate the layouts of a cluster, evaluate each (peak memory, step time and
the figures users compare), keep those that fit, rank them.

plan(problem, world, objective, space)  -> PlanResult (ranked plans, counts, advice)

Objectives: `speed` ranks by predicted step time (ties: less memory), `memory` by peak memory
per GPU (ties: faster). Memory is checked for every layout; step time only where it can matter:
for speed, not for a layout whose family (same degrees, micro-batch and schedule) has a fitting
member that recomputes, offloads and reshards no more than it (it cannot be faster); for
memory, only for the 3 x keep leanest layouts. When nothing fits, `PlanResult.advice` says what
would: the memory-saving options the search excluded, the smallest cluster (same GPUs, global
batch scaled with it), or a GPU with more memory.

Evaluating one layout: peak memory (memory.py), step time (steptime.py), and the figures users
compare — tokens/s, MFU, and TFLOP/s per GPU in the Megatron convention (recompute counted).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from triaxis.config import ParallelConfig, composition_problem
from triaxis.errors import UserError
from triaxis.parallel.partition import schedule_problem, stages_per_rank
from triaxis.plan.collectives import hierarchical_applies
from triaxis.plan.context import cp_memory_of, cp_time_of, pp_cp_pairs
from triaxis.plan.hardware import GIB, Catalog
from triaxis.plan.memory import stage_blocks
from triaxis.plan.problem import (
    AC_POLICIES,
    SCHEDULES,
    Layout,
    MemoryBreakdown,
    ModelShape,
    Plan,
    Problem,
    TimeBreakdown,
)
from triaxis.plan.steptime import recomputed_blocks

# ---------------------------------------------------------------------------------------------
# The enumeration


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
    mean something with dp_shard > 1; cp (space.max_cp) divides `seq_len` into 2 x cp chunks.
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
                        yield [x for x in family if composes(x)]


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
    p = ParallelConfig(
        dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard,
        pp=layout.pp,
        cp=layout.cp,
        pp_schedule=layout.schedule if layout.pp > 1 else ParallelConfig.pp_schedule,
        reshard_after_forward=layout.reshard_after_forward,
        **layout.runtime_ac(),
    )
    return composition_problem(p, fsdp=layout.dp * layout.cp > 1) is None


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


# ---------------------------------------------------------------------------------------------
# Evaluating one layout


def fits(p: Problem, layout: Layout, mem: MemoryBreakdown) -> bool:
    """Within the GPU's usable memory (and, offloaded, within 80% of the host's)."""
    if mem.total > p.hw.usable_memory_bytes:
        return False
    offloads = layout.cpu_offload or layout.offload_checkpoints
    return not offloads or mem.host_per_node <= 0.8 * p.hw.cluster.host_memory_bytes


def evaluate(
    p: Problem, layout: Layout, with_time: bool = True, mem: MemoryBreakdown | None = None
) -> Plan:
    """The plan of `layout`; with_time=False skips the step time (a memory-only check)."""
    num_micro = layout.num_micro_batches(p.global_batch)
    mem = mem or cp_memory_of(p, layout, num_micro)
    ok = fits(p, layout, mem)
    if not with_time:
        return Plan(layout, mem, TimeBreakdown(0.0), num_micro, 0.0, 0.0, 0.0, ok)
    t = cp_time_of(p, layout, num_micro)
    step = t.total
    tokens = p.global_batch * p.seq_len
    # Attention counts the keys each query really attends (document masking: fewer).
    model_flops = p.shape.model_flops_per_token(p.attn_keys) * tokens
    recomputed = sum(
        recomputed_blocks(layout, b) for b in stage_blocks(p.shape.n_layers, layout.pp)
    )
    hw_flops = model_flops + p.shape.recompute_flops_per_token(p.attn_keys, recomputed) * tokens
    world = layout.world_size
    return Plan(
        layout,
        mem,
        t,
        num_micro,
        tokens / step,
        model_flops / (step * world * p.hw.gpu.peak_flops),
        hw_flops / (step * world) / 1e12,
        ok,
    )


# ---------------------------------------------------------------------------------------------
# The planner


OBJECTIVES = ("speed", "memory")
MAX_CLUSTER = 2**17
"""The largest cluster the 'smallest cluster that fits' search tries."""


MODEL_ERROR = 0.08
"""The cost model's own error on step time: every reproduced published row is predicted within
it (tests/test_plan_published.py checks that it covers them). Speed-ranked layouts closer than
this are a tie on paper, and the report says so."""


@dataclass
class PlanResult:
    problem: Problem
    world_size: int
    objective: str
    plans: list[Plan]
    """Fitting plans, best first (at most `keep`)."""
    num_layouts: int
    """Layouts enumerated."""
    num_fit: int
    """Layouts that fit in memory."""
    num_timed: int = 0
    """Layouts whose step time was evaluated (the rest were dominated)."""
    leanest: Plan | None = None
    """The layout with the least memory, fitting or not (with its step time)."""
    advice: list[str] = field(default_factory=list)
    """What would make the model fit, when nothing does."""
    num_tied: int = 1
    """Plans (speed) predicted within MODEL_ERROR of the fastest, the fastest included."""
    alternative: Plan | None = None
    """The best evaluated plan whose degrees (tp, pp, dp_shard, dp_replicate) differ from the
    winner's: the nearest structurally different option, for the explanation."""


def degrees(layout: Layout) -> tuple[int, ...]:
    """A layout's structure: what its mesh looks like (the other knobs are minor)."""
    return (layout.tp, layout.pp, layout.dp_shard, layout.dp_replicate, layout.cp)


def plan(
    problem: Problem,
    world: int,
    objective: str = "speed",
    space: SearchSpace | None = None,
    keep: int = 10,
    catalog: Catalog | None = None,
) -> PlanResult:
    """Rank the layouts of `world` GPUs for `problem` by `objective`; keep the best `keep`.
    `catalog` lets the advice (when nothing fits) suggest a GPU with more memory."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} is unknown; use one of {list(OBJECTIVES)}")
    if world < 1:
        raise UserError(f"--gpus={world} must be >= 1")
    space = space or SearchSpace()
    count, num_fit, fitting, leanest = 0, 0, [], None
    for family in enumerate_families(
        problem.shape, world, problem.hw.gpus_per_node, problem.global_batch, space, problem.seq_len
    ):
        ok = []
        for layout in family:
            count += 1
            mem = cp_memory_of(problem, layout, layout.num_micro_batches(problem.global_batch))
            if leanest is None or mem.total < leanest[1].total:
                leanest = (layout, mem)
            if fits(problem, layout, mem):
                ok.append((layout, mem))
        num_fit += len(ok)
        if objective == "speed":
            ok = [
                (a, m)
                for a, m in ok
                if not any(b is not a and slower_or_equal(a, b) for b, _ in ok)
            ]
        fitting += ok
    if count == 0:
        raise UserError(_no_layout_message(problem, world))
    if objective == "speed":
        plans = sorted(
            (evaluate(problem, a, mem=m) for a, m in fitting),
            key=lambda p: (p.time.total, p.memory.total),
        )
    else:
        fitting.sort(key=lambda am: am[1].total)
        plans = sorted(
            (evaluate(problem, a, mem=m) for a, m in fitting[: 3 * keep]),
            key=lambda p: (p.memory.total, p.time.total),
        )
    result = PlanResult(problem, world, objective, plans[:keep], count, num_fit, len(plans))
    if plans:
        shape = degrees(plans[0].layout)
        result.alternative = next((q for q in plans if degrees(q.layout) != shape), None)
        if objective == "speed":
            limit = plans[0].time.total * (1 + MODEL_ERROR)
            result.num_tied = sum(q.time.total <= limit for q in plans)
    assert leanest is not None
    result.leanest = evaluate(problem, leanest[0], mem=leanest[1])
    if not plans:
        result.advice = advise(problem, world, space, catalog)
    return result


def _no_layout_message(problem: Problem, world: int) -> str:
    b = problem.global_batch
    return (
        f"no layout of {world} GPUs divides the global batch {b} (dp = dp_replicate x "
        f"dp_shard must divide it) and the model's {problem.shape.n_heads} heads; make the "
        f"global batch (--global-batch, train.global_batch) a multiple of {world}, or use "
        f"a GPU count that divides {b}"
    )


def fits_somewhere(problem: Problem, world: int, space: SearchSpace) -> bool:
    """Does any layout of `world` GPUs fit? (memory only; stops at the first that does)."""
    for layout in enumerate_layouts(
        problem.shape, world, problem.hw.gpus_per_node, problem.global_batch, space, problem.seq_len
    ):
        if evaluate(problem, layout, with_time=False).fits:
            return True
    return False


def advise(
    problem: Problem, world: int, space: SearchSpace, catalog: Catalog | None = None
) -> list[str]:
    """Ways out when no layout fits: options, cluster size, GPU type."""
    out: list[str] = []
    full = SearchSpace(max_micro_batch=space.max_micro_batch)
    if space != full and fits_somewhere(problem, world, full):
        off = []
        if not space.allow_offload:
            off.append("CPU offload (drop --no-offload)")
        if space.max_pp and space.max_pp < problem.shape.n_layers:
            off.append("pipeline parallelism (drop --no-pipeline / raise --max-pp)")
        if "full" not in space.ac_policies:
            off.append("full activation checkpointing (--ac full)")
        what = "; ".join(off) or "the options this search excluded"
        out.append(f"it fits on these {world} GPUs with {what}")
    per_gpu = problem.global_batch / world
    n = world * 2
    while n <= MAX_CLUSTER:
        bigger = dataclasses.replace(problem, global_batch=max(1, round(per_gpu * n)))
        if fits_somewhere(bigger, n, space):
            nodes = -(-n // problem.hw.gpus_per_node)
            out.append(
                f"the smallest cluster that fits is {n} x {problem.hw.gpu.name} "
                f"({nodes} node{'s' if nodes > 1 else ''}), with the global batch scaled to "
                f"{bigger.global_batch}"
            )
            break
        n *= 2
    else:
        out.append(f"no cluster of up to {MAX_CLUSTER} x {problem.hw.gpu.name} fits it")
    if catalog is not None:
        roomier = [
            g
            for g in catalog.gpus.values()
            if g.memory_bytes > problem.hw.gpu.memory_bytes and g.name != "cpu"
        ]
        for g in sorted(roomier, key=lambda g: g.memory_bytes):
            hw = dataclasses.replace(problem.hw, gpu=g)
            if fits_somewhere(dataclasses.replace(problem, hw=hw), world, space):
                out.append(f"{world} x {g.name} ({g.memory_bytes / GIB:.0f} GiB) would fit it")
                break
    return out
