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
from dataclasses import dataclass, field

from triaxis.errors import UserError
from triaxis.plan.context import cp_memory_of
from triaxis.plan.experts import moe_time_of
from triaxis.plan.hardware import GIB, Catalog
from triaxis.plan.layouts import SearchSpace, enumerate_families, enumerate_layouts, slower_or_equal
from triaxis.plan.memory import stage_blocks
from triaxis.plan.problem import Layout, MemoryBreakdown, Plan, Problem, TimeBreakdown
from triaxis.plan.steptime import recomputed_blocks

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
    t = moe_time_of(p, layout, num_micro)
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
    return (layout.tp, layout.pp, layout.dp_shard, layout.dp_replicate, layout.cp, layout.ep)


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
