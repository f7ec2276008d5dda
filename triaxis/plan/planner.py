"""The planner: enumerate layouts, drop those that do not fit, rank the rest.

    plan(problem, world, objective, space)  -> PlanResult (ranked plans, counts, advice)

Objectives: `speed` ranks by predicted step time (ties: less memory), `memory` by peak memory
per GPU (ties: faster). Memory is checked for every layout; step time only where it can matter:
for speed, not for a layout whose family (same degrees, micro-batch and schedule) has a fitting
member that recomputes, offloads and reshards no more than it (it cannot be faster); for
memory, only for the 3 x keep leanest layouts. When nothing fits, `PlanResult.advice` says what
would: the memory-saving options the search excluded, the smallest cluster (same GPUs, global
batch scaled with it), or a GPU with more memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from triaxis.errors import UserError
from triaxis.plan.cost import Plan, Problem, evaluate, fits
from triaxis.plan.hardware import GIB, Catalog
from triaxis.plan.layout import (SearchSpace, enumerate_families, enumerate_layouts,
                                 slower_or_equal)
from triaxis.plan.memory import memory_of

OBJECTIVES = ("speed", "memory")
MAX_CLUSTER = 2**17
"""The largest cluster the 'smallest cluster that fits' search tries."""


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


def plan(problem: Problem, world: int, objective: str = "speed",
         space: SearchSpace | None = None, keep: int = 10,
         catalog: Catalog | None = None) -> PlanResult:
    """Rank the layouts of `world` GPUs for `problem` by `objective`; keep the best `keep`.
    `catalog` lets the advice (when nothing fits) suggest a GPU with more memory."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} is unknown; use one of {list(OBJECTIVES)}")
    if world < 1:
        raise UserError(f"--gpus={world} must be >= 1")
    space = space or SearchSpace()
    count, num_fit, fitting, leanest = 0, 0, [], None
    for family in enumerate_families(problem.shape, world, problem.hw.gpus_per_node,
                                     problem.global_batch, space):
        ok = []
        for layout in family:
            count += 1
            mem = memory_of(problem, layout, layout.num_micro_batches(problem.global_batch))
            if leanest is None or mem.total < leanest[1].total:
                leanest = (layout, mem)
            if fits(problem, layout, mem):
                ok.append((layout, mem))
        num_fit += len(ok)
        if objective == "speed":
            ok = [(a, m) for a, m in ok
                  if not any(b is not a and slower_or_equal(a, b) for b, _ in ok)]
        fitting += ok
    if count == 0:
        raise UserError(_no_layout_message(problem, world))
    if objective == "speed":
        plans = sorted((evaluate(problem, a, mem=m) for a, m in fitting),
                       key=lambda p: (p.time.total, p.memory.total))
    else:
        fitting.sort(key=lambda am: am[1].total)
        plans = sorted((evaluate(problem, a, mem=m) for a, m in fitting[:3 * keep]),
                       key=lambda p: (p.memory.total, p.time.total))
    result = PlanResult(problem, world, objective, plans[:keep], count, num_fit, len(plans))
    assert leanest is not None
    result.leanest = evaluate(problem, leanest[0], mem=leanest[1])
    if not plans:
        result.advice = advise(problem, world, space, catalog)
    return result


def _no_layout_message(problem: Problem, world: int) -> str:
    b = problem.global_batch
    return (f"no layout of {world} GPUs divides the global batch {b} (dp = dp_replicate x "
            f"dp_shard must divide it) and the model's {problem.shape.n_heads} heads; make the "
            f"global batch (--global-batch, train.global_batch) a multiple of {world}, or use "
            f"a GPU count that divides {b}")


def fits_somewhere(problem: Problem, world: int, space: SearchSpace) -> bool:
    """Does any layout of `world` GPUs fit? (memory only; stops at the first that does)."""
    for layout in enumerate_layouts(problem.shape, world, problem.hw.gpus_per_node,
                                    problem.global_batch, space):
        if evaluate(problem, layout, with_time=False).fits:
            return True
    return False


def advise(problem: Problem, world: int, space: SearchSpace,
           catalog: Catalog | None = None) -> list[str]:
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
            out.append(f"the smallest cluster that fits is {n} x {problem.hw.gpu.name} "
                       f"({nodes} node{'s' if nodes > 1 else ''}), with the global batch scaled to "
                       f"{bigger.global_batch}")
            break
        n *= 2
    else:
        out.append(f"no cluster of up to {MAX_CLUSTER} x {problem.hw.gpu.name} fits it")
    if catalog is not None:
        roomier = [g for g in catalog.gpus.values()
                   if g.memory_bytes > problem.hw.gpu.memory_bytes and g.name != "cpu"]
        for g in sorted(roomier, key=lambda g: g.memory_bytes):
            hw = dataclasses.replace(problem.hw, gpu=g)
            if fits_somewhere(dataclasses.replace(problem, hw=hw), world, space):
                out.append(f"{world} x {g.name} ({g.memory_bytes / GIB:.0f} GiB) would fit it")
                break
    return out
