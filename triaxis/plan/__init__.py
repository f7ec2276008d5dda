"""The automatic layout planner: choose dp_replicate, dp_shard (MiCS), tp, pp, the pipeline
schedule, micro-batch, activation checkpointing and offload for a model on a cluster, on paper.

Data flow:

    hardware.py   GPU and cluster profiles from data/hardware.toml (+ --hardware FILE)
    problem.py    what is planned: the model's shape (ModelShape), the runtimes modelled, a
                  candidate Layout, the Problem, and what an evaluated Plan predicts
    activations.py  activation memory per GPU (Korthikanti et al.), checkpoints, in flight
    memory.py     peak memory per GPU: exact per-rank states under triaxis's sharding, those
                  activations, buffers
    collectives.py  ring/tree collective and send/recv times over each mesh axis's link
    steptime.py   step time: roofline compute, those collectives, exposed communication,
                  pipeline bubble, optimizer
    search.py     enumerate layouts, evaluate(problem, layout) -> Plan, plan(...): filter by
                  memory, rank; advice when nothing fits
    report.py     tables, explanation, TOML snippet, JSON
    cli.py        `triaxis plan` (add_parser)
    auto.py       plan_for_world: `triaxis train --parallel.auto=speed|memory`
    evidence.py   what the model is checked against: published results (data/published.toml)
                  and measured per-rank state bytes of real layouts on CPU (fake process group)
"""

from triaxis.plan.memory import predict_state_bytes_per_rank
from triaxis.plan.problem import Plan, Problem
from triaxis.plan.search import PlanResult, evaluate, plan

__all__ = [
    "Plan",
    "PlanResult",
    "Problem",
    "evaluate",
    "plan",
    "plan_for_world",
    "predict_state_bytes_per_rank",
]


def __getattr__(name: str):
    # Lazy: plan_for_world pulls in triaxis.config, which may one day import the planner.
    if name == "plan_for_world":
        from triaxis.plan.auto import plan_for_world

        return plan_for_world
    raise AttributeError(f"module 'triaxis.plan' has no attribute {name!r}")
