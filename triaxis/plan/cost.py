"""Evaluate one layout: peak memory (memory.py), step time (steptime.py), and the figures users
compare — tokens/s, MFU, and TFLOP/s per GPU in the Megatron convention (recompute counted)."""

from __future__ import annotations

from triaxis.plan.layout import Layout
from triaxis.plan.memory import memory_of
from triaxis.plan.problem import MemoryBreakdown, Plan, Problem, TimeBreakdown
from triaxis.plan.state_bytes import stage_blocks
from triaxis.plan.steptime import recomputed_blocks, time_of

__all__ = ["MemoryBreakdown", "Plan", "Problem", "TimeBreakdown", "evaluate", "fits"]


def fits(p: Problem, layout: Layout, mem: MemoryBreakdown) -> bool:
    """Within the GPU's usable memory (and, offloaded, within 80% of the host's)."""
    if mem.total > p.hw.usable_memory_bytes:
        return False
    offloads = layout.cpu_offload or layout.offload_checkpoints
    return not offloads or mem.host_per_node <= 0.8 * p.hw.cluster.host_memory_bytes


def evaluate(p: Problem, layout: Layout, with_time: bool = True,
             mem: MemoryBreakdown | None = None) -> Plan:
    """The plan of `layout`; with_time=False skips the step time (a memory-only check)."""
    num_micro = layout.num_micro_batches(p.global_batch)
    mem = mem or memory_of(p, layout, num_micro)
    ok = fits(p, layout, mem)
    if not with_time:
        return Plan(layout, mem, TimeBreakdown(0.0), num_micro, 0.0, 0.0, 0.0, ok)
    t = time_of(p, layout, num_micro)
    step = t.total
    tokens = p.global_batch * p.seq_len
    model_flops = p.shape.model_flops_per_token(p.seq_len) * tokens
    recomputed = sum(recomputed_blocks(layout, b) for b in stage_blocks(p.shape.n_layers,
                                                                         layout.pp))
    hw_flops = model_flops + p.shape.recompute_flops_per_token(p.seq_len, recomputed) * tokens
    world = layout.world_size
    return Plan(layout, mem, t, num_micro, tokens / step,
                model_flops / (step * world * p.hw.gpu.peak_flops),
                hw_flops / (step * world) / 1e12, ok)
