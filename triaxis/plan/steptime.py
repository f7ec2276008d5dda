"""Step time of a layout, for the slowest pipeline stage (the most blocks, plus the LM head):

    step = (m + bubble) x t_micro + exposed dp_replicate all-reduce + optimizer step

    t_micro = compute (forward, recomputed forward, backward of the stage's blocks and head)
            + TP collectives                       (not overlapped: on the compute stream)
            + exposed FSDP all-gathers and reduce-scatters
            + pipeline sends                       (not overlapped)
            + host copies when offloading (states; or checkpoints: exposed only past
              one block of compute)

Overlap, axis by axis (stated, not fitted):
  * tp: Megatron-style TP (+SP) puts 2 all-reduce-equivalents of b·s·h on the critical path in
    forward and 2 in backward of each block, 2 more per recomputed forward, and 2 for embedding
    and head. Not overlapped.
  * dp_shard (FSDP / MiCS): each block's parameters are all-gathered in forward (prefetched one
    block ahead) and, when resharded after forward, again in backward; gradients are
    reduce-scattered per block in backward. A block's collectives hide behind one block of
    compute; what exceeds it is exposed, and the first all-gather and last reduce-scatter of
    every micro-batch are exposed entirely. The root group (embedding + head) is gathered at the
    start of forward and of backward and reduced at the end: exposed.
  * dp_replicate: gradients are all-reduced across replicas once per step, block by block,
    behind the last micro-batch's backward (FSDP2 HSDP, DDP); only what exceeds it is exposed.
    Runtimes without that overlap (Megatron's local DDP) expose all of it.
  * pp: bubble = (p - 1) micro-batch slots for GPipe and 1F1B, (p - 1)/v interleaved, (p - 1)/3
    for ZB-H1 (Qi et al. 2023: with forward, input-gradient and weight-gradient passes of equal
    cost the bubble keeps F + B - W of F + B + W), 0 for ZB-H2 (which holds 2p - 1
    micro-batches instead of p).
"""

from __future__ import annotations

from functools import lru_cache

from triaxis.plan.collectives import (all_gather_s, all_reduce_s, axis_link, p2p_s,
                                      reduce_scatter_s)
from triaxis.plan.efficiency import block_time, head_time, optimizer_s
from triaxis.plan.layout import Layout
from triaxis.plan.memory import checkpoint_bytes_per_token
from triaxis.plan.problem import Problem, TimeBreakdown
from triaxis.plan.state_bytes import stage_blocks


def recomputed_blocks(layout: Layout, blocks: int) -> float:
    if layout.activation_checkpoint == "full":
        return float(blocks)
    if layout.activation_checkpoint == "selective":
        return float(blocks // layout.ac_every)
    return 0.0


def _exposed(n_blocks: int, comm: float, compute: float, tail: float) -> float:
    """Block-wise overlap: each block's comm hides behind one block of compute; `tail` has
    nothing left to hide behind."""
    return max(0, n_blocks - 1) * max(0.0, comm - compute) + tail


@lru_cache(maxsize=65536)
def _compute(p: Problem, tp: int, mb: int) -> tuple[float, float, float]:
    """(block forward, block backward, head forward + backward) seconds per micro-batch."""
    bt = block_time(p.shape, p.runtime, p.hw, mb, p.seq_len, tp, p.elem)
    ht = head_time(p.shape, p.hw, mb, p.seq_len, tp, p.elem)
    return bt.fwd_s, bt.bwd_s, ht.fwd_s + ht.bwd_s


@lru_cache(maxsize=65536)
def _fsdp_collectives(p: Problem, tp: int, ds: int) -> tuple[float, float, float, float]:
    """(block all-gather, block reduce-scatter, root all-gather, root reduce-scatter) seconds."""
    s, rt = p.shape, p.runtime
    if not rt.fsdp or ds == 1:
        return 0.0, 0.0, 0.0, 0.0
    link = axis_link(p.hw, ds, tp)
    blk = s.block_params() / tp
    root = (s.embedding_params() + s.head_params()) / tp
    return (all_gather_s(link, rt.gather_bytes * blk),
            reduce_scatter_s(link, rt.grad_reduce_bytes * blk),
            all_gather_s(link, rt.gather_bytes * root),
            reduce_scatter_s(link, rt.grad_reduce_bytes * root))


@lru_cache(maxsize=65536)
def _replica_all_reduce(p: Problem, tp: int, pp: int, ds: int, dr: int) -> float:
    """All-reduce of this rank's gradient shard across replicas (all of DP without FSDP)."""
    rt = p.runtime
    shard = ds if rt.fsdp else 1
    group = dr if rt.fsdp else dr * ds
    numel = p.shape.total_params() / pp / tp / shard
    return all_reduce_s(axis_link(p.hw, group, tp * shard), rt.grad_reduce_bytes * numel)


def time_of(p: Problem, layout: Layout, num_micro: int) -> TimeBreakdown:
    s, hw, e = p.shape, p.hw, p.elem
    tp, pp, ds, dr, mb = layout.tp, layout.pp, layout.dp_shard, layout.dp_replicate, \
        layout.micro_batch
    blocks = max(stage_blocks(s.n_layers, pp))
    fwd_blk, bwd_blk, head = _compute(p, tp, mb)
    recompute = recomputed_blocks(layout, blocks)
    compute_mb = blocks * (fwd_blk + bwd_blk) + recompute * fwd_blk + head

    act_bytes = e * mb * p.seq_len * s.dim
    tp_mb = all_reduce_s(axis_link(hw, tp, 1), act_bytes) * (4 * blocks + 2 * recompute + 2)

    ag, rs, ag_root, rs_root = _fsdp_collectives(p, tp, ds)
    bwd_gather = ag if layout.reshard_after_forward else 0.0
    bwd_compute = bwd_blk + (recompute / blocks) * fwd_blk
    fsdp_mb = 0.0
    if ag or rs:
        fsdp_mb = _exposed(blocks, ag, fwd_blk, ag) + \
            _exposed(blocks, bwd_gather + rs, bwd_compute, rs) + 2 * ag_root + rs_root
    offload_mb = 0.0
    if layout.cpu_offload:
        # Sharded fp32 parameters copied in before each gather, gradients copied out after.
        per_block = 4 * s.block_params() / tp / ds / hw.cluster.host_bytes_per_s
        offload_mb = per_block * (2 * blocks + 2)
    if layout.offload_checkpoints:
        # Each block input goes out behind its block's forward and comes back one block ahead
        # of its backward; only a copy longer than that block is exposed, plus the first
        # prefetch of backward.
        copy = checkpoint_bytes_per_token(s, p.runtime, tp, e) * mb * p.seq_len / \
            hw.cluster.host_bytes_per_s
        offload_mb += _exposed(blocks, copy, fwd_blk, 0.0) + \
            _exposed(blocks, copy, bwd_compute, copy)

    pp_mb = 0.0
    if pp > 1:
        crosses = tp * ds * dr >= hw.gpus_per_node
        pp_mb = 2 * layout.virtual_stages * p2p_s(hw, act_bytes / tp, crosses)

    t_micro = compute_mb + tp_mb + fsdp_mb + pp_mb + offload_mb

    ar = _replica_all_reduce(p, tp, pp, ds, dr)
    if ar and p.runtime.dp_overlap:
        base = rs if ag or rs else 0.0
        with_ar = _exposed(blocks, bwd_gather + base + ar / blocks, bwd_compute, base + ar / blocks)
        ar_exposed = with_ar - _exposed(blocks, bwd_gather + base, bwd_compute, base)
    else:
        ar_exposed = ar

    out = TimeBreakdown(compute=num_micro * compute_mb)
    out.exposed_comm = {"tp": num_micro * tp_mb, "dp_shard": num_micro * fsdp_mb,
                        "dp_replicate": ar_exposed, "pp": num_micro * pp_mb}
    if offload_mb:
        out.exposed_comm["offload"] = num_micro * offload_mb
    out.bubble = bubble_slots(layout) * t_micro
    params = s.total_params() / pp / tp / (ds if p.runtime.fsdp else 1)
    out.optimizer = optimizer_s(hw, params, layout.cpu_offload)
    return out


def bubble_slots(layout: Layout) -> float:
    p = layout.pp
    if p == 1:
        return 0.0
    return {"gpipe": p - 1.0, "1f1b": p - 1.0, "interleaved-1f1b": (p - 1) / layout.virtual_stages,
            "zb-h1": (p - 1) / 3, "zb-h2": 0.0}[layout.schedule]
