"""Mixtures of experts in the cost model: expert parallelism (`ep`) as one more layout degree.

An MoE layout is priced as its dense twin (every block with the dense MLP of ffn_dim, what the
dense cost model knows) plus, for each MoE block of the slowest stage, what the MoE changes:

  * compute: the feed-forward a rank runs -- the router, its n_experts / ep experts on the rows
    routed to them (k x T x ep / n_experts each, uniform routing; capacity-padded rows with a
    capacity factor), the shared experts -- in place of the twin's MLP. Under tp the MoE block
    is replicated (triaxis.parallel.moe_tp): every tp rank computes it on the whole sequence.
    Backward is twice the forward, as for the dense GEMMs; recomputed blocks run it again;
  * all-to-all (`ep` in the exposed communication): per MoE block and micro-batch, dispatch
    and combine forward and again backward (plus the dispatch and combine of every recomputed
    forward). Each rank sends k x T x (ep - 1) / ep rows of dim elements in each: the
    all_to_all_single of triaxis.parallel.expert. On the critical path (not overlapped). An ep
    group is ep consecutive dp_shard ranks (stride tp): NVLink inside a node, the network
    beyond (`all_to_all_bytes` is what bench/moe_ep.py counts against the runtime);
  * FSDP: a rank gathers its own experts over edp = dp_shard / ep only (and the router and
    shared experts over dp_shard) instead of the twin's MLP over dp_shard; what this adds to the
    block's gathers and reduce-scatters beyond its compute is exposed;
  * optimizer and replica all-reduce: the extra parameters a rank holds.

Memory is counted in triaxis.plan.memory with triaxis.plan.expert_memory (all experts held).
FLOPs for MFU count the active parameters (k experts per token: triaxis.model.args).
"""

from __future__ import annotations

import dataclasses
import functools

from triaxis.plan.collectives import (
    all_gather_s,
    all_reduce_s,
    all_to_all_s,
    axis_link,
    reduce_scatter_s,
)
from triaxis.plan.context import cp_time_of
from triaxis.plan.expert_memory import (
    dense_mlp_params,
    moe_block_delta,
    moe_blocks_of_stage,
    moe_gathered_parts,
)
from triaxis.plan.memory import stage_blocks
from triaxis.plan.problem import Layout, ModelShape, Problem, TimeBreakdown
from triaxis.plan.steptime import (
    _compute,
    _fsdp_collectives,
    _replica_all_reduce,
    bubble_slots,
    gemm_s,
    optimizer_s,
    recomputed_blocks,
)


def ep_degrees(shape: ModelShape, dp_shard: int, cp: int) -> list[int]:
    """The ep the search tries: 1, and every divisor of dp_shard that divides n_experts (the
    runtime's rule, triaxis.parallel.dims), without context parallelism (the runtime refuses
    ep x cp)."""
    if not shape.n_experts or cp > 1:
        return [1]
    return [e for e in range(1, dp_shard + 1) if dp_shard % e == 0 and shape.n_experts % e == 0]


@functools.cache
def _dense_problem(p: Problem) -> Problem:
    # Cached: the cost model caches its per-problem pieces on the Problem object itself.
    return dataclasses.replace(p, shape=p.shape.dense)


def tokens_per_micro_batch(p: Problem, layout: Layout) -> int:
    """Tokens one rank routes per micro-batch: the whole sequence (replicated under tp)."""
    return layout.micro_batch * p.seq_len


def rows_per_expert(p: Problem, layout: Layout) -> float:
    """Rows each of a rank's experts computes per micro-batch: the k x T assignments of the
    ep ranks spread over n_experts (uniform routing), or the capacity they are padded to."""
    s, tokens = p.shape, tokens_per_micro_batch(p, layout)
    if s.moe_capacity_factor > 0:
        per_source = -(-s.moe_capacity_factor * tokens * s.moe_top_k // s.n_experts)
        return per_source * layout.ep
    return tokens * s.moe_top_k * layout.ep / s.n_experts


def all_to_all_bytes(p: Problem, layout: Layout) -> float:
    """Bytes one rank sends to the other ranks of its ep group in one all-to-all of one MoE
    block and micro-batch (dispatch; the combine sends as much back): k x T x (ep - 1) / ep rows
    of dim elements, routing uniform, nothing dropped."""
    s, ep = p.shape, layout.ep
    rows = tokens_per_micro_batch(p, layout) * s.moe_top_k * (ep - 1) / ep
    return rows * s.dim * p.elem


def moe_forward_s(p: Problem, layout: Layout) -> float:
    """One MoE feed-forward's forward on one rank, less its dense twin's MLP (on 1/tp)."""
    s, hw, e = p.shape, p.hw, p.elem
    tokens, h, tp = tokens_per_micro_batch(p, layout), s.dim, layout.tp
    rows = rows_per_expert(p, layout)
    moe = gemm_s(hw, tokens, s.n_experts, h, e)  # router
    moe += (s.n_experts // layout.ep) * (
        2 * gemm_s(hw, rows, s.moe_ffn_dim, h, e) + gemm_s(hw, rows, h, s.moe_ffn_dim, e)
    )
    if s.n_shared_experts:
        hs = s.n_shared_experts * s.moe_ffn_dim
        moe += 2 * gemm_s(hw, tokens, hs, h, e) + gemm_s(hw, tokens, h, hs, e)
    # The dispatch's gathers, sorts and scatters: memory-bound, k x T rows of dim each way.
    moved = 4 * tokens * s.moe_top_k * h * e
    moe += hw.calib.elementwise_traffic * moved / hw.gpu.hbm_bytes_per_s
    f = s.ffn_dim / tp
    twin = (s.mlp_matrices - 1) * gemm_s(hw, tokens, f, h, e) + gemm_s(hw, tokens, h, f, e)
    return moe - twin


def _fsdp_delta(p: Problem, layout: Layout) -> tuple[float, float]:
    """(all-gather, reduce-scatter) seconds one MoE block adds over its twin's: the rank's
    experts over edp, router and shared experts over dp_shard, less the twin's MLP."""
    s, rt, hw = p.shape, p.runtime, p.hw
    ds, tp, ep = layout.dp_shard, layout.tp, layout.ep
    if not rt.fsdp or ds == 1:
        return 0.0, 0.0
    experts, rest = moe_gathered_parts(s, ep)
    edp, dsl = axis_link(hw, ds // ep, tp * ep), axis_link(hw, ds, tp)
    twin = dense_mlp_params(s, tp)

    def both(op, width):
        out = op(dsl, width * rest) - op(dsl, width * twin)
        return out + (op(edp, width * experts) if ds // ep > 1 else 0.0)

    return both(all_gather_s, rt.gather_bytes), both(reduce_scatter_s, rt.grad_reduce_bytes)


def moe_time_of(p: Problem, layout: Layout, num_micro: int) -> TimeBreakdown:
    """Step time of `layout` (cp or not); for an MoE model its dense twin's plus what the MoE
    blocks of the slowest stage change (module docstring)."""
    if not p.shape.n_experts:
        return cp_time_of(p, layout, num_micro)
    dense = _dense_problem(p)
    t = cp_time_of(dense, layout, num_micro)
    s, hw, tp, pp = p.shape, p.hw, layout.tp, layout.pp
    counts = stage_blocks(s.n_layers, pp)
    stage = max(range(pp), key=lambda i: (counts[i], moe_blocks_of_stage(s, counts, i)))
    blocks, moe = counts[stage], moe_blocks_of_stage(s, counts, stage)
    recomputed = recomputed_blocks(layout, blocks) * moe / blocks
    fwd = moe_forward_s(p, layout)
    compute_mb = moe * 3 * fwd + recomputed * fwd
    # all-to-all: dispatch + combine per forward (and recomputed forward) and per backward.
    a2a_mb = 0.0
    if layout.ep > 1:
        link = axis_link(hw, layout.ep, tp)
        one = all_to_all_s(hw, link, all_to_all_bytes(p, layout))
        a2a_mb = (4 * moe + 2 * recomputed) * one
    # FSDP: the extra gathers and reduce-scatters, beyond what the block's compute hides.
    fwd_blk, bwd_blk, _, _ = _compute(dense, tp, layout.micro_batch)
    ag, rs, _, _ = _fsdp_collectives(dense, tp, layout.dp_shard, layout.hierarchical)
    d_ag, d_rs = _fsdp_delta(p, layout)
    regather = layout.reshard_after_forward
    fwd_new, bwd_new = fwd_blk + fwd, bwd_blk + 2 * fwd

    def exposed(comm, d_comm, compute, new_compute):
        return max(0.0, comm + d_comm - new_compute) - max(0.0, comm - compute)

    fsdp_fwd = exposed(ag, d_ag, fwd_blk, fwd_new)
    fsdp_bwd = exposed(ag * regather + rs, d_ag * regather + d_rs, bwd_blk, bwd_new)
    fsdp_mb = (
        moe * (fsdp_fwd + fsdp_bwd)
        if pp == 1
        else moe * exposed(ag * regather, d_ag * regather, bwd_blk, bwd_new)
    )
    fsdp_step = 0.0 if pp == 1 else moe * (fsdp_fwd + exposed(rs, d_rs, bwd_blk, bwd_new))
    t.compute += num_micro * compute_mb
    t.exposed_comm["dp_shard"] += num_micro * fsdp_mb + fsdp_step
    t.exposed_comm["ep"] = num_micro * a2a_mb
    t.bubble += bubble_slots(layout) * (compute_mb + a2a_mb + fsdp_mb)
    # The extra parameters a rank holds: optimizer step and replica all-reduce.
    fsdp_on = p.runtime.fsdp and layout.dp > 1
    shard = layout.dp_shard if fsdp_on else 1
    extra = moe * moe_block_delta(s, tp, shard, layout.ep)[0]
    t.optimizer += optimizer_s(hw, max(0, extra), layout.cpu_offload)
    if layout.dp_replicate > 1 and extra > 0:
        # Behind the last micro-batch's backward, as the dense gradients' all-reduce.
        link = axis_link(hw, layout.dp_replicate, tp * shard)
        more = all_reduce_s(link, p.runtime.grad_reduce_bytes * extra)
        ar = _replica_all_reduce(dense, tp, pp, layout.dp_shard, layout.dp_replicate)
        t.exposed_comm["dp_replicate"] += exposed(ar, more, blocks * bwd_blk, blocks * bwd_new)
    return t
