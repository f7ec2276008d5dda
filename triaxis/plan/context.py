"""Context parallelism in the cost model.

A layout with cp = C is priced as the cp = 1 layout each of its ranks looks like -- T/C tokens
of every sequence, parameters sharded over dp_shard x C (`local_view`) -- plus the two things
that view leaves out:

  * attention over the other ranks' keys: a rank's T/C queries still attend to all the keys
    before them (head-tail chunks give every rank the same share), so its attention work is
    (T/C) x T / 2, not (T/C)^2 / 2;
  * the ring (triaxis.parallel.ring_attention): per block and micro-batch, C-1 hops of K/V
    forward, and C-1 hops of K/V plus C hops of their fp32 gradient accumulators backward,
    each 2 x T/C x kv_dim / tp elements per sample. Each hop overlaps one ring step's share of
    the attention compute; only what is longer is exposed. On NVLink inside a node, on the
    network (EFA) when tp x cp spans nodes.

Activation memory therefore divides by C; the in-flight K/V blocks (send and receive buffers)
are added to the communication buffers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

from triaxis.plan.collectives import p2p_s
from triaxis.plan.memory import memory_of, stage_blocks
from triaxis.plan.problem import Layout, MemoryBreakdown, Problem, TimeBreakdown
from triaxis.plan.steptime import gemm_s, recomputed_blocks, time_of


@functools.cache
def _local_problem(p: Problem, cp: int) -> Problem:
    # Cached: the cost model caches its per-problem pieces on the Problem object itself.
    return dataclasses.replace(p, seq_len=p.seq_len // cp)


def local_view(p: Problem, layout: Layout) -> tuple[Problem, Layout]:
    """The (problem, cp = 1 layout) one rank of `layout` computes like."""
    if layout.cp == 1:
        return p, layout
    return _local_problem(p, layout.cp), _cp_view(layout)


def _cp_view(layout: Layout) -> Layout:
    # A copy with two fields changed, without dataclasses.replace: its re-validation made a
    # sixth of a 1,024-GPU plan's time, and moving ranks from cp to dp_shard keeps the layout
    # valid (Layout.__post_init__ checks only checkpointing against offload).
    view = object.__new__(Layout)
    view.__dict__.update(layout.__dict__, cp=1, dp_shard=layout.dp_shard * layout.cp)
    return view


def cp_memory_of(p: Problem, layout: Layout, num_micro: int) -> MemoryBreakdown:
    lp, view = local_view(p, layout)
    mem = memory_of(lp, view, num_micro)
    if layout.cp > 1:
        mem.comm_buffers += 2 * kv_block_bytes(p, layout)  # the block sent and the one received
    return mem


def cp_time_of(p: Problem, layout: Layout, num_micro: int) -> TimeBreakdown:
    lp, view = local_view(p, layout)
    t = time_of(lp, view, num_micro)
    if layout.cp == 1:
        return t
    blocks = max(stage_blocks(p.shape.n_layers, layout.pp))
    recomputed = recomputed_blocks(layout, blocks)
    full = attention_fwd_s(p, layout, lp.seq_len, p.attn_keys)
    local = attention_fwd_s(p, layout, lp.seq_len, lp.attn_keys)
    extra = full - local  # forward; backward is 2.5x (flash) the forward's work
    t.compute += num_micro * ((blocks + recomputed) * extra + blocks * 2.5 * extra)
    t.exposed_comm["cp"] = num_micro * (
        (blocks + recomputed) * ring_exposed_s(p, layout, full, backward=False)
        + blocks * ring_exposed_s(p, layout, 2.5 * full, backward=True)
    )
    return t


def kv_block_bytes(p: Problem, layout: Layout) -> float:
    """One ring hop: K and V of a rank's T/cp tokens (its tp share of the KV heads)."""
    tokens = layout.micro_batch * p.seq_len / layout.cp
    return 2 * tokens * p.shape.kv_dim / layout.tp * p.elem


def attention_fwd_s(p: Problem, layout: Layout, queries: int, keys: int) -> float:
    """Forward attention time of one block for `queries` tokens per sample over `keys` keys
    each (causal: half of queries x keys computed)."""
    s, hw, mb, tp = p.shape, p.hw, layout.micro_batch, layout.tp
    if p.runtime.flash_attention:
        flops = 4 * mb * queries * keys * s.dim / tp / 2
        return flops / (hw.gpu.peak_flops * hw.gpu.flash_attention_efficiency)
    batch = mb * s.n_heads / tp
    return batch * (
        gemm_s(hw, queries, keys, s.head_dim, p.elem)
        + gemm_s(hw, queries, s.head_dim, keys, p.elem)
    )


def ring_exposed_s(p: Problem, layout: Layout, attention_s: float, backward: bool) -> float:
    """Exposed ring time of one block: cp steps, each hop hidden behind 1/cp of the block's
    attention (`attention_s`). Backward sends K/V and the fp32 dK/dV accumulators together;
    the accumulators' last hop home follows the last step and is exposed whole."""
    cp = layout.cp
    crosses = layout.tp * cp > p.hw.gpus_per_node
    kv = kv_block_bytes(p, layout)
    hop = p2p_s(p.hw, kv, crosses)
    step = attention_s / cp
    if not backward:
        return (cp - 1) * max(0.0, hop - step)
    grads = p2p_s(p.hw, kv * 4 / p.elem, crosses)
    return (cp - 1) * max(0.0, hop + grads - step) + grads


def pp_cp_pairs(
    ranks: int, gpus_per_node: int, max_cp: int, seq_len: int
) -> Iterator[tuple[int, int]]:
    """(pp, cp) pairs the search tries for `ranks` (the world over tp): cp up to max_cp (0: GPUs
    per node) where seq_len splits into 2 x cp chunks, with or without a pipeline (each stage
    computes its blocks on T/cp tokens: local_view)."""
    divisors = [d for d in range(1, ranks + 1) if ranks % d == 0]
    for pp in divisors:
        yield pp, 1
        if not seq_len:
            continue
        for cp in divisors[1:]:
            if (
                (ranks // pp) % cp == 0
                and cp <= (max_cp or gpus_per_node)
                and seq_len % (2 * cp) == 0
            ):
                yield pp, cp
