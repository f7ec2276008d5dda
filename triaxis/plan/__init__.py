"""The automatic layout planner: choose dp_replicate, dp_shard (MiCS), tp, pp, the pipeline
schedule, micro-batch, activation checkpointing and offload for a model on a cluster, on paper.

Data flow:

    shape.py        the model: sizes, parameters, FLOPs (ModelShape; from ModelArgs or GPT rows)
    hardware.py     GPU and cluster profiles from data/hardware.toml (+ --hardware FILE)
    layout.py       a candidate Layout, the runtimes modelled, the enumeration
    state_bytes.py  exact per-rank bytes of params/grads/AdamW under triaxis's sharding
    memory.py       activations (Korthikanti et al.), buffers, peak memory per GPU
    efficiency.py   compute time: roofline per GEMM, memory-bound elementwise kernels
    collectives.py  ring/tree collective costs over NVLink / EFA / InfiniBand
    steptime.py     step time: compute, exposed communication per axis, bubble, optimizer
    cost.py         evaluate(problem, layout) -> Plan
    planner.py      plan(...): enumerate, filter by memory, rank; advice when nothing fits
    report.py       tables, explanation, TOML snippet, JSON
    cli.py          `triaxis plan` (add_parser)
    auto.py         plan_for_world: `triaxis train --parallel.auto=speed|memory`
    published.py    published results (data/published.toml) and their predictions
    measure.py      measured per-rank state bytes of real layouts on CPU (fake process group)
"""

from triaxis.plan.cost import Plan, Problem, evaluate
from triaxis.plan.planner import PlanResult, plan
from triaxis.plan.state_bytes import predict_state_bytes_per_rank

__all__ = ["Plan", "PlanResult", "Problem", "evaluate", "plan", "plan_for_world",
           "predict_state_bytes_per_rank"]


def __getattr__(name: str):
    # Lazy: plan_for_world pulls in triaxis.config, which may one day import the planner.
    if name == "plan_for_world":
        from triaxis.plan.auto import plan_for_world

        return plan_for_world
    raise AttributeError(f"module 'triaxis.plan' has no attribute {name!r}")
