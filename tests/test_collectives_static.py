"""Every collective call in the package, classified by where its tensors live (issue 23).

On GPUs the default and mesh groups are NCCL groups, which serve device tensors only; host
values cross ranks through triaxis/parallel/host.py (a gloo host group, or onto the device
first). A new `dist.<collective>(...)` call fails this test until it is added below with the
reason it is safe; tests/test_device_rules.py then checks the claim at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import triaxis

COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "send_object_list",
    "recv_object_list",
    "barrier",
    "monitored_barrier",
}

SITES = {
    # host values: only through the helper, over a gloo host group
    ("parallel/host.py", "host_all_reduce"): ["all_reduce"],
    ("parallel/host.py", "host_all_gather"): ["all_gather"],
    ("parallel/host.py", "host_all_gather_object"): ["all_gather_object"],
    # device tensors on device groups
    ("train/loop.py", "Trainer._masked_scale"): ["all_reduce"],  # counts of device targets
    ("train/loop.py", "Trainer.reduce_over_dp"): ["all_reduce"],  # device losses
    # MoE figures of each pipeline stage's blocks, a table made on the trainer's device
    ("train/record.py", "_moe_figures.reduce"): ["all_reduce"],
    ("train/optim.py", "clip_grad_norm"): ["all_reduce"],  # the norm, on the device
    ("model/moe.py", "update_expert_bias"): ["all_reduce"],  # expert counts: model buffers
    # expert parallelism: routed rows and their gradients, and the per-expert counts that
    # size them, all made on the device (the splits reach the host after the exchange)
    ("parallel/expert.py", "_AllToAll.forward"): ["all_to_all_single"],
    ("parallel/expert.py", "_AllToAll.backward"): ["all_to_all_single"],
    ("parallel/expert.py", "ep_dispatch_compute_combine"): ["all_to_all_single"],
    ("parallel/ring_attention.py", "gather_doc_ids"): ["all_gather"],  # the batch's device ids
    ("parallel/ring_attention.py", "_Ring.__init__"): ["isend", "irecv"],  # device K/V blocks
    ("parallel/pipeline.py", "Pipeline.step"): ["all_reduce"],  # device losses
    ("parallel/pipeline.py", "Pipeline.eval"): ["all_reduce"],
    ("parallel/pipeline.py", "Pipeline._send"): ["send", "send"],  # header moved to the device
    ("parallel/pipeline.py", "Pipeline._recv"): ["recv", "recv"],  # buffers made on the device
    ("parallel/hierarchical.py", "HierarchicalAllGather.__call__"): [
        "all_gather_single",
        "all_gather_single",
    ],  # FSDP's device buffers
    ("parallel/hierarchical.py", "HierarchicalReduceScatter.__call__"): [
        "reduce_scatter_single",
        "reduce_scatter_single",
    ],
    ("net/bench.py", "_call"): [
        "all_reduce",
        "all_gather_single",
        "reduce_scatter_single",
        "all_to_all_single",
        "broadcast",
    ],  # buffers made on the device
    ("net/bench.py", "time_op"): ["barrier", "all_reduce"],  # elapsed time made on the device
    ("net/bench.py", "run_worker"): ["barrier"],
    # no tensor of ours: barriers, and object collectives, which torch pickles onto the
    # group's device (the current CUDA device under NCCL)
    ("train/distributed.py", "shutdown"): ["barrier"],
    ("checkpoint/dcp_load.py", "_barrier"): ["barrier"],
    ("train/resilience.py", "hold_run_lock"): ["broadcast_object_list"],
}
"""(file under triaxis/, function) -> the collectives it calls, in source order."""


SHIMMED = ("all_gather_single", "reduce_scatter_single")
"""Collectives called by bare name through triaxis/parallel/compat.py (torch 2.11 lacks them)."""


def _collective(node) -> str | None:
    """The collective a call node makes: `dist.NAME(...)`, or a compat shim called by name."""
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "dist":
        return f.attr if f.attr in COLLECTIVES else None
    if isinstance(f, ast.Name) and f.id in SHIMMED:
        return f.id
    return None


def _calls() -> dict[tuple[str, str], list[str]]:
    root = Path(triaxis.__file__).parent
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()

        def visit(node, scope: list[str]) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, [*scope, child.name])
                    continue
                name = _collective(child)
                if name is not None and rel != "parallel/compat.py":
                    key = (rel, ".".join(scope))
                    found.setdefault(key, []).append((child.lineno, name))
                visit(child, scope)

        visit(ast.parse(path.read_text()), [])
    return {k: [name for _, name in sorted(v)] for k, v in found.items()}


def test_every_collective_call_is_classified():
    found = _calls()
    new = {k: v for k, v in found.items() if SITES.get(k) != v}
    assert not new, (
        f"collective calls not classified in SITES: {new}; a host value goes through "
        "triaxis/parallel/host.py, a device tensor may use its device group"
    )
    stale = sorted(set(SITES) - set(found))
    assert not stale, f"SITES lists calls that are gone: {stale}"


def test_host_groups_come_from_the_helper():
    """A gloo group made elsewhere would be a second way for host values to travel."""
    root = Path(triaxis.__file__).parent
    makers = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if 'backend="gloo"' in p.read_text() or "backend='gloo'" in p.read_text()
    ]
    assert makers == [], makers
