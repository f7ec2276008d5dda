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
    every micro-batch (of every chunk, with v pipeline chunks per rank) are exposed entirely.
    The root group (embedding + head) is gathered at the
    start of forward and of backward and reduced at the end: exposed.
  * dp_replicate: gradients are all-reduced across replicas once per step, block by block,
    behind the last micro-batch's backward (FSDP2 HSDP, DDP); only what exceeds it is exposed.
    Runtimes without that overlap (Megatron's local DDP) expose all of it.
  * pp: bubble = (p - 1) micro-batch slots for gpipe and 1f1b, (p - 1)/v interleaved-1f1b,
    (p - 1)/3 for interleaved-zb as ZB-H1 (Qi et al. 2023: with forward, input-gradient and
    weight-gradient passes of equal cost the bubble keeps F + B - W of F + B + W), 0 for zbv as
    ZB-H2 (which holds 2p - 1 micro-batches instead of p).

Compute: one transformer block on one GPU, a roofline per kernel.

A GEMM of (m x k) @ (k x n) does 2mnk FLOPs and moves at least e(mk + kn + mn) bytes. Its time is
modelled as the sum of its compute time at the GPU's large-GEMM efficiency and its memory time at
HBM bandwidth:

    t = 2mnk / (peak x gemm_efficiency) + e(mk + kn + mn) / hbm_bandwidth

The sum (rather than the max of a strict roofline) is the honest smooth form: a tile loads its
operands and then multiplies, and the two overlap only partly. So the achievable fraction of peak
depends on the matrix sizes per GPU after the TP split: 1 / (1 + ridge / intensity), with
intensity 1 / (1/m + 1/n + 1/k) FLOP/byte (x 2/e) and ridge = peak x efficiency / bandwidth. A
block of h = 2304 on one A100 reaches ~93% of the large-GEMM rate; attention scores with head
dim 96 reach ~40%.

Everything that is not a GEMM (norms, activations, rotary, softmax, dropout, residual adds) is
memory-bound: it moves `elementwise_traffic` bytes per byte of activation it saves for backward
in forward, twice that in backward (calibration constant, one for all hardware).

Communication: the ring / tree formulas of triaxis.plan.collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

from triaxis.parallel.float8_filter import eligible_dims
from triaxis.plan.activations import checkpoint_bytes_per_token, layer_activation_bytes_per_token
from triaxis.plan.collectives import (
    all_gather_s,
    all_reduce_s,
    axis_link,
    hierarchical_gather_s,
    p2p_s,
    reduce_scatter_s,
)
from triaxis.plan.float8 import converted, converted_block_params, fp8_gemm_s, uses_fp8_all_gather
from triaxis.plan.hardware import Hardware
from triaxis.plan.memory import stage_blocks
from triaxis.plan.problem import Layout, ModelShape, Problem, TimeBreakdown
from triaxis.plan.runtimes import Runtime

# ---------------------------------------------------------------------------------------------
# Compute: a roofline per kernel


def gemm_s(hw: Hardware, m: float, n: float, k: float, elem: int) -> float:
    g = hw.gpu
    return (
        2 * m * n * k / (g.peak_flops * g.gemm_efficiency)
        + elem * (m * k + k * n + m * n) / g.hbm_bytes_per_s
    )


@dataclass(frozen=True)
class BlockTime:
    """Seconds of one block for one micro-batch on one GPU."""

    fwd_s: float
    bwd_s: float
    cheap_fwd_s: float = 0.0
    """The forward's ops other than the projections and a fused attention kernel (norms,
    rotary, SiLU; the attention core too where it is not one kernel): what op-level selective
    checkpointing runs again."""


def block_time(
    shape: ModelShape,
    rt: Runtime,
    hw: Hardware,
    micro_batch: int,
    seq: int,
    tp: int,
    elem: int,
    keys: int = 0,
    float8: str = "off",
    float8_min_dim: int = 1024,
) -> BlockTime:
    """`keys`: keys per query under document masking (0 = seq): a flash kernel skips the blocks
    outside the documents; the dense path still computes the whole seq x seq. `float8`: the
    recipe of train.float8 (triaxis.plan.float8 prices the converted projections)."""
    t_tokens = micro_batch * seq
    h, kv, f = shape.dim, shape.kv_dim, shape.ffn_dim

    def proj(n_in: int, n_out: int, colwise: bool) -> float:
        """One projection's forward GEMM on this rank; float8 if the trainer converts it."""
        n, k = (n_out / tp, n_in) if colwise else (n_out, n_in / tp)
        if float8 != "off" and eligible_dims(n_in, n_out, float8_min_dim):
            return fp8_gemm_s(hw, t_tokens, n, k, elem, float8)
        return gemm_s(hw, t_tokens, n, k, elem)

    # Projections; backward runs two GEMMs of the same size per forward GEMM (data + weight).
    if rt.fused_qkv:
        fwd = proj(h, h + 2 * kv, True)
    else:
        fwd = proj(h, h, True) + 2 * proj(h, kv, True)
    fwd += proj(h, h, False)  # output projection (row-wise)
    fwd += (shape.mlp_matrices - 1) * proj(h, f, True)
    fwd += proj(f, h, False)
    bwd = 2 * fwd
    # Attention core: scores and weighted values, 4·b·s²·h/tp FLOPs forward.
    heads = shape.n_heads / tp
    if rt.flash_attention:
        # Causal flash kernels skip the masked half; backward does 2.5x the forward's work.
        flops = 4 * micro_batch * seq * (keys or seq) * h / tp / 2
        t_attn = flops / (hw.gpu.peak_flops * hw.gpu.flash_attention_efficiency)
        fwd, bwd = fwd + t_attn, bwd + 2.5 * t_attn
    else:
        batch = micro_batch * heads
        t_attn = batch * (
            gemm_s(hw, seq, seq, shape.head_dim, elem) + gemm_s(hw, seq, shape.head_dim, seq, elem)
        )
        fwd, bwd = fwd + t_attn, bwd + 2 * t_attn
    act = layer_activation_bytes_per_token(shape, rt, seq, tp, elem) * t_tokens
    t_elem = hw.calib.elementwise_traffic * act / hw.gpu.hbm_bytes_per_s
    # Op-level checkpointing keeps a fused attention kernel's output (activations.op_save_list).
    cheap = t_elem if rt.flash_attention else t_attn + t_elem
    return BlockTime(fwd + t_elem, bwd + 2 * t_elem, cheap)


def head_time(
    shape: ModelShape, hw: Hardware, micro_batch: int, seq: int, tp: int, elem: int
) -> BlockTime:
    """LM head GEMM (vocabulary split by tp) and the cross-entropy over its logits."""
    t_tokens = micro_batch * seq
    fwd = gemm_s(hw, t_tokens, shape.vocab_size / tp, shape.dim, elem)
    logits = t_tokens * shape.vocab_size / tp * (elem + 4)
    t_loss = hw.calib.elementwise_traffic * logits / hw.gpu.hbm_bytes_per_s
    return BlockTime(fwd + t_loss, 2 * fwd + 2 * t_loss)


def optimizer_s(hw: Hardware, params_per_gpu: float, offloaded: bool) -> float:
    """AdamW + gradient-norm clipping: memory-bound, ~32 bytes per fp32 parameter (read param,
    grad twice, both moments; write param and moments). On the host when offloaded."""
    if offloaded:
        return params_per_gpu / hw.calib.cpu_adam_params_per_s
    return 32 * params_per_gpu / hw.gpu.hbm_bytes_per_s


# ---------------------------------------------------------------------------------------------
# Step time of a layout


def recomputed_blocks(layout: Layout, blocks: int) -> float:
    """Blocks whose whole forward runs again (op-level recomputes no projection: 0)."""
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
def _compute(p: Problem, tp: int, mb: int) -> tuple[float, float, float, float]:
    """(block forward, block backward, head forward + backward, block cheap ops forward)
    seconds per micro-batch."""
    bt = block_time(
        p.shape, p.runtime, p.hw, mb, p.seq_len, tp, p.elem, p.attn_keys,
        p.float8, p.float8_min_dim,
    )  # fmt: skip
    ht = head_time(p.shape, p.hw, mb, p.seq_len, tp, p.elem)
    return bt.fwd_s, bt.bwd_s, ht.fwd_s + ht.bwd_s, bt.cheap_fwd_s


@lru_cache(maxsize=65536)
def _fsdp_collectives(
    p: Problem, tp: int, ds: int, hierarchical: bool = False
) -> tuple[float, float, float, float]:
    """(block all-gather, block reduce-scatter, root all-gather, root reduce-scatter) seconds."""
    s, rt = p.shape, p.runtime
    if not rt.fsdp or ds == 1:
        return 0.0, 0.0, 0.0, 0.0
    link = axis_link(p.hw, ds, tp)
    blk = rt.gather_bytes * s.block_params() / tp
    if uses_fp8_all_gather(p.float8, p.hw, rt.fsdp, ds):
        # The converted weights travel as float8: 1 byte instead of gather_bytes.
        blk -= (rt.gather_bytes - 1) * converted_block_params(s, p.float8_min_dim) / tp
    root = (s.embedding_params() + s.head_params()) / tp
    if hierarchical:
        two = lambda nbytes: hierarchical_gather_s(p.hw, ds, tp, nbytes)  # noqa: E731
        ag, rs = two, two
    else:
        ag, rs = partial(all_gather_s, link), partial(reduce_scatter_s, link)
    return (
        ag(blk),
        rs(rt.grad_reduce_bytes * s.block_params() / tp),
        ag(rt.gather_bytes * root),
        rs(rt.grad_reduce_bytes * root),
    )


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
    tp, pp, ds, dr, mb = (
        layout.tp,
        layout.pp,
        layout.dp_shard,
        layout.dp_replicate,
        layout.micro_batch,
    )
    blocks = max(stage_blocks(s.n_layers, pp))
    fwd_blk, bwd_blk, head, cheap_blk = _compute(p, tp, mb)
    recompute = recomputed_blocks(layout, blocks)
    # Op-level: every block runs its cheap ops again, and (TP) its two all-gathers: the
    # projections' saved outputs need their gathered inputs again in backward.
    op = layout.activation_checkpoint == "op"
    recompute_s = recompute * fwd_blk + (blocks * cheap_blk if op else 0.0)
    compute_mb = blocks * (fwd_blk + bwd_blk) + recompute_s + head

    act_bytes = e * mb * p.seq_len * s.dim
    tp_collectives = 4 * blocks + 2 * recompute + 2 + (blocks if op else 0)
    tp_mb = all_reduce_s(axis_link(hw, tp, 1), act_bytes) * tp_collectives

    ag, rs, ag_root, rs_root = _fsdp_collectives(p, tp, ds, layout.hierarchical)
    bwd_gather = ag if layout.reshard_after_forward else 0.0
    bwd_compute = bwd_blk + recompute_s / blocks
    fsdp_mb = fsdp_step = 0.0
    if ag or rs:
        # Prefetch runs within a chunk: each of a rank's v pipeline chunks starts with a gather
        # and ends with a reduce-scatter that nothing hides (the chunk before it waited on a
        # pipeline receive), so interleaving exposes v tails per micro-batch, not one.
        chunks = layout.virtual_stages if pp > 1 else 1
        n = blocks / chunks
        if pp == 1:
            fsdp_mb = (
                _exposed(n, ag, fwd_blk, ag)
                + _exposed(n, bwd_gather + rs, bwd_compute, rs)
                + 2 * ag_root
                + rs_root
            )
        else:
            # torch's pipeline schedules keep blocks gathered after backward and reduce the
            # gradients once, after the last micro-batch (memory.memory_of): per step one
            # forward gather and one reduce-scatter; per micro-batch only the backward
            # re-gather of a block resharded after its forward.
            fsdp_mb = chunks * _exposed(n, bwd_gather, bwd_compute, bwd_gather)
            fsdp_step = chunks * (
                _exposed(n, ag, fwd_blk, ag) + _exposed(n, rs, bwd_compute, rs)
            ) + (2 * ag_root + rs_root)
    if uses_fp8_all_gather(p.float8, hw, p.runtime.fsdp, ds):
        # torchao's precompute after the optimizer step: one amax all-reduce of all the
        # stage's converted weights (an fp32 scalar each).
        weights = blocks * len(converted(s, p.float8_min_dim))
        fsdp_step += all_reduce_s(axis_link(hw, ds, tp), 4 * weights)
    offload_mb = 0.0
    if layout.cpu_offload:
        # Sharded fp32 parameters copied in before each gather, gradients copied out after.
        per_block = 4 * s.block_params() / tp / ds / hw.cluster.host_bytes_per_s
        offload_mb = per_block * (2 * blocks + 2)
    if layout.offload_checkpoints:
        # Each block input goes out behind its block's forward and comes back one block ahead
        # of its backward; only a copy longer than that block is exposed, plus the first
        # prefetch of backward.
        copy = (
            checkpoint_bytes_per_token(s, p.runtime, tp, e)
            * mb
            * p.seq_len
            / hw.cluster.host_bytes_per_s
        )
        offload_mb += _exposed(blocks, copy, fwd_blk, 0.0) + _exposed(
            blocks, copy, bwd_compute, copy
        )

    pp_mb = 0.0
    if pp > 1:
        crosses = tp * ds * dr >= hw.gpus_per_node
        # Each micro-batch crosses 2·v stage boundaries on a rank (activations forward, their
        # gradients back). Every rank sends its 1/tp of the activation: the sequence shard
        # under SP; without SP Megatron's scatter/gather, whose receiver then all-gathers the
        # whole activation over NVLink before the next chunk can start -- a cost interleaving
        # multiplies by v like the sends themselves.
        hop = p2p_s(hw, act_bytes / tp, crosses)
        if tp > 1 and not p.runtime.sequence_parallel:
            hop += all_gather_s(axis_link(hw, tp, 1), act_bytes)
        pp_mb = 2 * layout.virtual_stages * hop

    t_micro = compute_mb + tp_mb + fsdp_mb + pp_mb + offload_mb

    ar = _replica_all_reduce(p, tp, pp, ds, dr)
    if ar and p.runtime.dp_overlap:
        base = rs if ag or rs else 0.0
        with_ar = _exposed(blocks, bwd_gather + base + ar / blocks, bwd_compute, base + ar / blocks)
        ar_exposed = with_ar - _exposed(blocks, bwd_gather + base, bwd_compute, base)
    else:
        ar_exposed = ar

    out = TimeBreakdown(compute=num_micro * compute_mb)
    out.exposed_comm = {
        "tp": num_micro * tp_mb,
        "dp_shard": num_micro * fsdp_mb + fsdp_step,
        "dp_replicate": ar_exposed,
        "pp": num_micro * pp_mb,
    }
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
    return {
        "gpipe": p - 1.0,
        "1f1b": p - 1.0,
        "interleaved-1f1b": (p - 1) / layout.virtual_stages,
        "interleaved-zb": (p - 1) / 3,
        "zbv": 0.0,
    }[layout.schedule]
