"""`triaxis plan --float8`: plan with a given FP8 recipe, or (`auto`) plan each recipe and
keep the one whose best layout wins the objective, saying why in one line."""

from __future__ import annotations

import dataclasses

from triaxis.errors import UserError
from triaxis.plan.float8 import RECIPES, check_float8, converted
from triaxis.plan.problem import Problem
from triaxis.plan.search import PlanResult, SearchSpace, plan


def _key(r: PlanResult, objective: str) -> tuple[float, ...]:
    w = r.plans[0]
    if objective == "memory":
        return (w.memory.total, w.time.total)
    return (w.time.total,)


def plan_float8(
    problem: Problem,
    world: int,
    objective: str,
    space: SearchSpace,
    keep: int,
    catalog,
    choice,
    recipes: tuple[str, ...] = RECIPES,
) -> tuple[PlanResult, str]:
    """(the plan, a one-line note on the float8 choice; empty when float8 was not asked).
    recipes: those `auto` may choose (parallel.auto drops rowwise under train.dtype=fp32)."""
    hw = problem.hw
    check_float8(hw, choice)
    none = not converted(problem.shape, problem.float8_min_dim)
    if none and choice in RECIPES:
        raise UserError(
            f"--float8 {choice}: no block linear of {problem.shape.name} has in and out features "
            f">= train.float8_min_dim={problem.float8_min_dim}, so nothing would convert; "
            "pass --float8 off"
        )
    if choice != "auto":
        fixed = dataclasses.replace(problem, float8=choice)
        return plan(fixed, world, objective, space, keep, catalog), ""
    runs = {"off": plan(problem, world, objective, space, keep, catalog)}
    if hw.gpu.fp8_flops <= 0:
        return runs["off"], f"float8 off: {hw.gpu.name} has no FP8 matrix units"
    if none:
        return runs["off"], (
            f"float8 off: no block linear reaches train.float8_min_dim={problem.float8_min_dim}"
        )
    for recipe in recipes:
        p = dataclasses.replace(problem, float8=recipe)
        runs[recipe] = plan(p, world, objective, space, keep, catalog)
    fitting = {k: r for k, r in runs.items() if r.plans}
    if not fitting:
        return runs["off"], "float8 off: no layout fits with or without it"
    best = min(fitting, key=lambda k: _key(fitting[k], objective))
    base = fitting.get("off")
    words = []
    for k, r in fitting.items():
        if k != "off" and base is not None:
            speed = base.plans[0].time.total / r.plans[0].time.total
            words.append(f"{k} {speed:.2f}x")
    versus = f" (tokens/s against float8 off, each at its best layout: {', '.join(words)})"
    if best == "off":
        why = "the FP8 GEMMs save less than their casts cost at this width and batch"
        return fitting[best], f"float8 off: {why}{versus if words else ''}"
    t = fitting[best].plans[0].time.total
    ref = f"{t:.3f} s/step against {base.plans[0].time.total:.3f}" if base else f"{t:.3f} s/step"
    return fitting[best], f"float8 {best}: {ref}{versus if words else ''}"
