"""The planner's own words: a tie is called a tie, and a runner-up that differs only in a minor
knob comes with the nearest structurally different layout and why #1 beats it."""

from __future__ import annotations

import dataclasses

from triaxis.plan.hardware import load_catalog, resolve_hardware
from triaxis.plan.problem import Layout, Problem, TimeBreakdown, load_model
from triaxis.plan.report import explain
from triaxis.plan.runtimes import RUNTIMES
from triaxis.plan.search import MODEL_ERROR, PlanResult, evaluate, plan


def _problem(model="8b", gpu="h100", gpus=8) -> Problem:
    hw = resolve_hardware(load_catalog(), gpu, None, None)
    shape, _ = load_model(model)
    return Problem(shape, hw, RUNTIMES["triaxis"], 4096, 64)


def _with_step(plan, seconds: float):
    """The plan with its step time scaled to `seconds` (every part in proportion)."""
    t, k = plan.time, seconds / plan.time.total
    scaled = TimeBreakdown(
        t.compute * k, {a: v * k for a, v in t.exposed_comm.items()}, t.bubble * k, t.optimizer * k
    )
    return dataclasses.replace(plan, time=scaled)


def _result(problem, plans, alternative=None, tied=1) -> PlanResult:
    r = PlanResult(problem, 8, "speed", plans, 100, 50, 50)
    r.alternative, r.num_tied = alternative, tied
    return r


def test_layouts_within_the_models_error_are_called_a_tie():
    p = _problem()
    a = evaluate(p, Layout(1, 8, 1, 1, 1, "full"))
    b = evaluate(p, Layout(2, 4, 1, 1, 1, "full"))
    close = _result(p, [_with_step(a, 10.0), _with_step(b, 10.0 * (1 + MODEL_ERROR / 2))], tied=2)
    words = explain(close)
    assert "tie" in words and "2 layouts (#1 to #2)" in words and "not a prediction" in words
    assert "slower, mostly" not in words
    far = _result(p, [_with_step(a, 10.0), _with_step(b, 10.0 * (1 + 2 * MODEL_ERROR))])
    words = explain(far)
    assert "tie" not in words and f"is {2 * MODEL_ERROR:.1%} slower" in words


def test_a_minor_runner_up_brings_the_nearest_structural_alternative():
    """#2 differs from #1 only in the micro-batch: the report also names the best layout with
    other degrees (here tp=2) and where it loses and gains against #1."""
    p = _problem()
    w = evaluate(p, Layout(1, 8, 1, 1, 2, "full"))
    minor = evaluate(p, Layout(1, 8, 1, 1, 1, "full"))
    tp2 = evaluate(p, Layout(1, 4, 2, 1, 2, "full"))
    words = explain(_result(p, [w, minor], alternative=tp2))
    assert "differs only in micro-batch" in words
    assert "tp=2 instead of 1" in words and "dp_shard=4 instead of 8" in words
    assert tp2.layout.describe() in words
    assert "exposed tp communication" in words  # what tp=2 pays for (its per-layer traffic)
    # A structurally different runner-up needs no such sentence.
    words = explain(_result(p, [w, tp2], alternative=tp2))
    assert "differs only in" not in words


def test_plan_counts_the_ties_and_finds_the_alternative():
    r = plan(_problem("1b", "a100-80g"), 8, "speed", keep=3)
    best = r.plans[0]
    limit = best.time.total * (1 + MODEL_ERROR)
    assert r.num_tied >= sum(q.time.total <= limit for q in r.plans) >= 1
    alt = r.alternative
    assert alt is not None
    assert (alt.layout.tp, alt.layout.pp, alt.layout.dp_shard, alt.layout.dp_replicate) != (
        best.layout.tp,
        best.layout.pp,
        best.layout.dp_shard,
        best.layout.dp_replicate,
    )
    assert alt.time.total >= best.time.total
