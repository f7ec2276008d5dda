"""What `triaxis plan` prints: tables, the explanation of the winner, the TOML snippet, JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from triaxis.plan.experts import all_to_all_bytes, ep_degrees
from triaxis.plan.hardware import GIB
from triaxis.plan.mapping import parallel_config
from triaxis.plan.problem import Plan
from triaxis.plan.search import MODEL_ERROR, PlanResult, degrees, evaluate

COMM_COLUMNS = ("tp", "cp", "dp_shard", "dp_replicate", "pp")
"""The exposed-communication columns of the step-time table: the mesh axes innermost first (the
reverse of triaxis.parallel.dims.AXES, the mesh order); an MoE model's table adds `ep` (its
all-to-all) after cp."""


def _comm_columns(r: PlanResult) -> tuple[str, ...]:
    if not r.problem.shape.n_experts:
        return COMM_COLUMNS
    return COMM_COLUMNS[:2] + ("ep",) + COMM_COLUMNS[2:]


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def header(r: PlanResult) -> str:
    p, s = r.problem, r.problem.shape
    tokens = p.global_batch * p.seq_len
    return (
        f"triaxis plan: {s.name} ({s.total_params() / 1e9:.2f}B parameters) on "
        f"{r.world_size} x {p.hw.describe()}\n"
        f"seq {p.seq_len}, global batch {p.global_batch} ({tokens / 1e6:.2f}M tokens), "
        f"objective {r.objective}{_float8_words(p.float8)}: {r.num_layouts} layouts "
        f"enumerated, {r.num_fit} fit in "
        f"{_gib(p.hw.usable_memory_bytes)} GiB usable per GPU, {r.num_timed} timed"
    )


def _float8_words(recipe: str) -> str:
    return f", float8 {recipe} (FP8 GEMMs in the blocks)" if recipe != "off" else ""


def _ordinal(k: int) -> str:
    return f"{k}{'tsnrhtdd'[(k // 10 % 10 != 1) * (k % 10 < 4) * k % 10 :: 4]}"


def tables(r: PlanResult, top: int = 5) -> str:
    shown = r.plans[:top]
    width = max([len(p.layout.describe()) for p in shown] + [6])
    rows = [
        "",
        f"{'#':>2}  {'layout':<{width}} {'step s':>8} {'tok/s':>10} {'MFU':>6}",
    ]
    for i, p in enumerate(shown, 1):
        rows.append(
            f"{i:>2}  {p.layout.describe():<{width}} {p.time.total:>8.3f} "
            f"{p.tokens_per_s:>10.4g} {p.mfu:>6.1%}"
        )
    rows += [
        "",
        "memory per GPU (GiB)",
        f"{'#':>2}  {'params':>7} {'grads':>7} {'optim':>7} "
        f"{'activ':>7} {'comm':>7} {'total':>7} {'host/node':>10}",
    ]
    for i, p in enumerate(shown, 1):
        m = p.memory
        rows.append(
            f"{i:>2}  {_gib(m.params):>7} {_gib(m.grads):>7} {_gib(m.optim):>7} "
            f"{_gib(m.activations):>7} {_gib(m.comm_buffers):>7} {_gib(m.total):>7} "
            f"{_gib(m.host_per_node):>10}"
        )
    rows += [
        "",
        "step time (s): compute, exposed communication per mesh axis, pipeline bubble",
        f"{'#':>2}  {'compute':>8} "
        + " ".join(f"{a:>12}" for a in _comm_columns(r))
        + f" {'offload':>8} {'bubble':>8} {'optim':>7} {'micro':>6}",
    ]
    for i, p in enumerate(shown, 1):
        t = p.time
        rows.append(
            f"{i:>2}  {t.compute:>8.3f} "
            + " ".join(f"{t.exposed_comm.get(a, 0.0):>12.3f}" for a in _comm_columns(r))
            + f" {t.exposed_comm.get('offload', 0.0):>8.3f} {t.bubble:>8.3f} "
            f"{t.optimizer:>7.3f} {p.num_micro_batches:>6}"
        )
    return "\n".join(rows)


MINOR_KNOBS = {
    "micro_batch": "micro-batch",
    "activation_checkpoint": "checkpointing",
    "ac_every": "checkpointing interval",
    "schedule": "pipeline schedule",
    "virtual_stages": "stages per rank",
    "cpu_offload": "offload",
    "reshard_after_forward": "resharding",
}
"""Layout knobs that leave the mesh (search.degrees) as it is, in words."""


def _knobs_differing(a: Plan, b: Plan) -> list[str]:
    return [
        words
        for knob, words in MINOR_KNOBS.items()
        if getattr(a.layout, knob) != getattr(b.layout, knob)
    ]


def _gain_and_loss(a: Plan, b: Plan) -> tuple[str, str]:
    """Where b's step time grows most over a's, and where it shrinks most, in words."""
    parts = {
        "compute": b.time.compute - a.time.compute,
        "the pipeline bubble": b.time.bubble - a.time.bubble,
        "the optimizer step": b.time.optimizer - a.time.optimizer,
    }
    for axis in set(a.time.exposed_comm) | set(b.time.exposed_comm):
        parts[f"exposed {axis} communication"] = b.time.exposed_comm.get(
            axis, 0.0
        ) - a.time.exposed_comm.get(axis, 0.0)
    lost = max(parts.items(), key=lambda kv: kv[1])
    won = min(parts.items(), key=lambda kv: kv[1])
    return f"{lost[0]} (+{lost[1]:.3f} s)", (f"{won[0]} ({won[1]:.3f} s)" if won[1] < 0 else "")


def _runner_up_words(r: PlanResult) -> list[str]:
    """The runner-up, honestly: a tie when within the model's error; and when it differs only
    in minor knobs, the nearest layout with other degrees and why #1 beats it."""
    if len(r.plans) < 2:
        return []
    w, b = r.plans[0], r.plans[1]
    if r.objective == "memory":
        return [
            f"Runner-up {b.layout.describe()} needs "
            f"{_gib(b.memory.total - w.memory.total)} GiB more per GPU."
        ]
    out = []
    gap = b.time.total / w.time.total - 1
    if gap <= MODEL_ERROR:
        out.append(
            f"{r.num_tied} layouts (#1 to #{r.num_tied}) are predicted within "
            f"{MODEL_ERROR:.0%} of #1's step time, the cost model's own error against "
            f"published runs (the runner-up: {gap:+.1%}): on paper they tie, so their order "
            "is not a prediction; measure the ones you would consider (a few steps each) "
            "before preferring one."
        )
    else:
        lost, _ = _gain_and_loss(w, b)
        out.append(f"Runner-up {b.layout.describe()} is {gap:.1%} slower, mostly from {lost}.")
    knobs = _knobs_differing(w, b)
    alt = r.alternative
    if knobs and degrees(b.layout) == degrees(w.layout) and alt is not None:
        lost, won = _gain_and_loss(w, alt)
        diff = ", ".join(
            f"{name}={getattr(alt.layout, name)} instead of {getattr(w.layout, name)}"
            for name in ("tp", "pp", "dp_shard", "dp_replicate", "cp", "ep")
            if getattr(alt.layout, name) != getattr(w.layout, name)
        )
        alt_gap = alt.time.total / w.time.total - 1
        verdict = (
            "a tie within the model's error" if alt_gap <= MODEL_ERROR else f"{alt_gap:.1%} slower"
        )
        out.append(
            f"The runner-up differs only in {' and '.join(knobs)}; the nearest layout with "
            f"other degrees ({diff}: {alt.layout.describe()}) is {verdict}: it loses on "
            f"{lost}" + (f" and gains on {won}" if won else "") + "."
        )
    return out


def explain(r: PlanResult) -> str:
    """A short paragraph: why the winner, and what the runner-up loses."""
    if not r.plans:
        return "No layout fits in memory."
    w, hw = r.plans[0], r.problem.hw
    a, t, m = w.layout, w.time, w.memory
    gpn = hw.gpus_per_node
    out = []
    if a.tp > 1:
        out.append(
            f"tp={a.tp} splits every block's matrices inside one node "
            + (f"({gpn} processes)" if hw.gpu.name == "cpu" else f"({gpn} GPUs on NVLink)")
            + "; its per-layer collectives cannot overlap and cost "
            f"{t.exposed_comm['tp']:.3f} s per step."
        )
    else:
        out.append("tp=1: no per-layer activation traffic; the matrices stay whole and fast.")
    if a.pp > 1:
        frac = t.bubble / t.total
        sched = a.schedule + (
            f" with {a.virtual_stages} virtual stages" if a.virtual_stages > 1 else ""
        )
        out.append(
            f"pp={a.pp} ({sched}) over {w.num_micro_batches} micro-batches costs a "
            f"{frac:.1%} bubble."
        )
    if a.cp > 1:
        out.append(
            f"cp={a.cp} splits every sequence over {a.cp} GPUs (activations 1/{a.cp}); the "
            f"ring's K/V transfers leave {t.exposed_comm.get('cp', 0.0):.3f} s exposed, and "
            f"FSDP shards states over dp_shard x cp = {a.dp_shard * a.cp} GPUs."
        )
    states = m.params + m.grads + m.optim
    group = a.dp_shard * a.tp
    where = f"{group // gpn} nodes" if group > gpn else "one node"
    state_txt = (
        f"{_gib(m.host_per_node / gpn)} GiB per GPU, offloaded to the host"
        if a.cpu_offload
        else f"{_gib(states)} GiB per GPU"
    )
    if a.dp_shard > 1:
        out.append(
            f"dp_shard={a.dp_shard} (a MiCS partition group of {group} GPUs, {where}) "
            f"holds parameters, gradients and AdamW states in {state_txt}; its gathers "
            f"and reduce-scatters leave {t.exposed_comm['dp_shard']:.3f} s exposed."
        )
    elif a.cp == 1:
        out.append(
            f"dp_shard=1: every rank keeps whole parameters, gradients and AdamW states "
            f"({state_txt}), so nothing is gathered per block."
        )
    if a.dp_replicate > 1:
        out.append(
            f"dp_replicate={a.dp_replicate} replicas all-reduce gradients once per step "
            f"({t.exposed_comm['dp_replicate']:.3f} s exposed)."
        )
    ac = {
        "none": "no activation checkpointing",
        "full": "full activation checkpointing",
        "selective": f"checkpointing every {_ordinal(a.ac_every)} block",
        "op": "op-level selective checkpointing (matmul outputs kept)",
    }[a.activation_checkpoint]
    if a.offload_checkpoints:
        ac += " (block inputs offloaded to the host)"
    out += _expert_words(r)
    out.append(
        f"Micro-batch {a.micro_batch} with {ac} keeps activations at "
        f"{_gib(m.activations)} GiB of the {_gib(m.total)} GiB peak "
        f"({_gib(hw.usable_memory_bytes)} usable)."
    )
    out += _runner_up_words(r)
    return " ".join(out)


def _expert_words(r: PlanResult) -> list[str]:
    """An MoE plan: what its ep does, and the same layout at each other ep the experts allow."""
    s = r.problem.shape
    if not s.n_experts:
        return []
    w = r.plans[0]
    a, gpn = w.layout, r.problem.hw.gpus_per_node
    if a.ep > 1:
        where = "inside one node" if a.ep * a.tp <= gpn else f"across {a.ep * a.tp // gpn} nodes"
        mib = all_to_all_bytes(r.problem, a) / 2**20
        text = (
            f"ep={a.ep} splits each MoE block's {s.n_experts} experts over {a.ep} GPUs "
            f"({s.n_experts // a.ep} each, {where}); every all-to-all sends {mib:.1f} MiB per "
            f"GPU, 4 per block and micro-batch, leaving {w.time.exposed_comm.get('ep', 0.0):.3f}"
            " s exposed per step (on the critical path)."
        )
    else:
        text = (
            f"ep=1: every GPU computes all {s.n_experts} experts of each MoE block, gathered "
            "over dp_shard with the rest of the block: no all-to-all."
        )
    others = []
    for ep in ep_degrees(s, a.dp_shard, a.cp):
        if ep == a.ep:
            continue
        o = evaluate(r.problem, dataclasses.replace(a, ep=ep))
        if not o.fits:
            others.append(f"ep={ep} does not fit ({_gib(o.memory.total)} GiB)")
        else:
            gap = o.time.total / w.time.total - 1
            others.append(f"ep={ep} is {gap:+.1%} ({_gain_and_loss(w, o)[0]})")
    if others:
        text += " The same layout with " + "; ".join(others) + "."
    return [text]


SNIPPET_FIELDS = (
    "dp_replicate",
    "dp_shard",
    "tp",
    "pp",
    "reshard_after_forward",
    "cpu_offload",
    "loss_parallel",
    "activation_checkpoint",
    "ac_selective",
    "ac_every",
    "activation_offload",
    "hierarchical",
)
"""The [parallel] fields every snippet states; a pipelined one adds its schedule, stages per
rank and stage split."""


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f'"{v}"' if isinstance(v, str) else str(v)


def toml_snippet(r: PlanResult, plan: Plan | None = None) -> str:
    """A [parallel] + [train] + [data] snippet that `triaxis train CONFIG.toml` accepts: the
    ParallelConfig `mapping.parallel_config` makes of the layout (what parallel.auto runs)."""
    p = plan or r.plans[0]
    a = p.layout
    par = parallel_config(a, r.problem.shape.n_layers)
    names = SNIPPET_FIELDS + (("pp_schedule", "pp_virtual_stages", "pp_layers") if a.pp > 1 else ())
    names += ("cp",) if a.cp > 1 else ()
    names += ("ep",) if a.ep > 1 else ()
    lines = [
        f"# triaxis plan: {r.problem.shape.name} on {r.world_size} x "
        f"{r.problem.hw.gpu.name} ({r.problem.hw.cluster.name}), objective "
        f"{r.objective}",
        f"# predicted {p.time.total:.3f} s/step, {p.tokens_per_s:.4g} tokens/s, MFU "
        f"{p.mfu:.1%}, peak {_gib(p.memory.total)} GiB per GPU",
        "[parallel]",
        *(f"{n} = {_toml_value(getattr(par, n))}" for n in names),
        "",
        "[train]",
        f"micro_batch = {a.micro_batch}",
        f"global_batch = {r.problem.global_batch}",
        *([f'float8 = "{r.problem.float8}"'] if r.problem.float8 != "off" else []),
        "",
        "[data]",
        f"seq_len = {r.problem.seq_len}",
    ]
    return "\n".join(lines) + "\n"


def plan_dict(p: Plan) -> dict[str, Any]:
    m = p.memory
    return {
        "layout": dataclasses.asdict(p.layout),
        "memory_gib": {
            "params": m.params / GIB,
            "grads": m.grads / GIB,
            "optim": m.optim / GIB,
            "activations": m.activations / GIB,
            "comm_buffers": m.comm_buffers / GIB,
            "total": m.total / GIB,
            "host_per_node": m.host_per_node / GIB,
        },
        "time_s": {
            "compute": p.time.compute,
            "exposed_comm": p.time.exposed_comm,
            "bubble": p.time.bubble,
            "optimizer": p.time.optimizer,
            "total": p.time.total,
        },
        "num_micro_batches": p.num_micro_batches,
        "tokens_per_s": p.tokens_per_s,
        "mfu": p.mfu,
        "hw_tflops_per_gpu": p.hw_tflops_per_gpu,
        "fits": p.fits,
    }


def to_json(r: PlanResult, top: int = 5) -> dict[str, Any]:
    pr = r.problem
    return {
        "model": dataclasses.asdict(pr.shape),
        "gpus": r.world_size,
        "gpu": pr.hw.gpu.name,
        "cluster": pr.hw.cluster.name,
        "gpus_per_node": pr.hw.gpus_per_node,
        "seq_len": pr.seq_len,
        "global_batch": pr.global_batch,
        "objective": r.objective,
        "float8": pr.float8,
        "usable_memory_gib": pr.hw.usable_memory_bytes / GIB,
        "num_layouts": r.num_layouts,
        "num_fit": r.num_fit,
        "plans": [plan_dict(p) for p in r.plans[:top]],
        "explanation": explain(r),
        "toml": toml_snippet(r) if r.plans else None,
        "leanest": plan_dict(r.leanest) if r.leanest else None,
        "advice": r.advice,
    }


def no_fit_message(r: PlanResult) -> str:
    """Nothing fits: what the leanest layout needs, and what would make the model fit."""
    hw, lean = r.problem.hw, r.leanest
    usable = _gib(hw.usable_memory_bytes)
    msg = (
        f"{r.problem.shape.name} does not fit on {r.world_size} x {hw.gpu.name} under any of "
        f"{r.num_layouts} layouts: "
    )
    if lean is None:
        msg += "none was enumerated."
    elif lean.memory.total <= hw.usable_memory_bytes:
        msg += (
            f"the leanest ({lean.layout.describe()}) needs {_gib(lean.memory.total)} of "
            f"the {usable} GiB usable per GPU, but {_gib(lean.memory.host_per_node)} GiB of "
            f"offloaded states per node, over 80% of the host's "
            f"{_gib(hw.cluster.host_memory_bytes)} GiB."
        )
    else:
        msg += (
            f"the leanest ({lean.layout.describe()}) needs {_gib(lean.memory.total)} GiB "
            f"per GPU, {usable} GiB is usable."
        )
    if r.advice:
        msg += " Instead: " + "; ".join(r.advice) + "."
    return msg
