"""Activation memory per GPU of a layout (what a block keeps for backward, checkpoints, the
loss, micro-batches in flight, offloaded checkpoints).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), term by term, so that both GPT-style published models and triaxis's own
Llama blocks are counted from one list. Bytes per token of one block (element size e = 2 in bf16,
4 in fp32; t = tp):

    norm inputs          2 x e·h       (triaxis' eager fp32 RMSNorm keeps 2 x 4h per norm)
    q/k/v input          e·h           (gathered; only Megatron-style SP keeps it sharded)
    q, k, v              e·(h + 2kv)/t (+ 4(h + kv)/t: triaxis's fp32 rotary copies)
    scores               (2e + 1)·a·s/t with dropout, e·a·s/t without; 0 with flash attention
                         (flash keeps its output and a 4-byte log-sum-exp per head instead)
    projection input     e·h/t
    MLP input            e·h
    MLP inside           2e·f/t (GELU: fc1 out, GELU out); 4e·f/t (SwiGLU: w1, silu, w3, product)
    dropout masks        2·h (GPT only)

GPT with e = 2, f = 4h and no parallelism gives 34·h + 5·a·s: the paper's s·b·h·(34 + 5as/h).
Without sequence parallelism the norms, inputs and masks are replicated over TP (10h + 24h/t).
"""

from __future__ import annotations

from functools import lru_cache

from triaxis.plan.problem import Layout, ModelShape, Problem
from triaxis.plan.runtimes import Runtime


@lru_cache(maxsize=4096)
def layer_activation_bytes_per_token(
    shape: ModelShape, rt: Runtime, seq: int, tp: int, elem: int
) -> float:
    """Bytes one block keeps for backward per token (no checkpointing), on one TP rank."""
    h, kv, f, a = shape.dim, shape.kv_dim, shape.ffn_dim, shape.n_heads
    eager = rt.eager_fp32_kernels
    sp_div = tp if rt.sequence_parallel else 1
    inputs_div = tp if (rt.sequence_parallel and not rt.sp_saves_gathered_inputs) else 1
    norms = 2 * (8 if eager else elem) * h / sp_div
    masks = (2 * h / sp_div) if shape.dropout else 0.0
    inputs = 2 * elem * h / inputs_div
    qkv = elem * (h + 2 * kv) / tp + (4 * (h + kv) / tp if eager else 0.0)
    if rt.flash_attention:
        core = (elem * h + 4 * a) / tp  # output (wo's input is a separate reshaped copy) + lse
    else:
        core = (2 * elem + 1 if shape.dropout else elem) * a * seq / tp
    proj = elem * h / tp
    mlp = (4 if shape.gated_mlp else 2) * elem * f / tp
    return norms + masks + inputs + qkv + core + proj + mlp


def checkpoint_bytes_per_token(shape: ModelShape, rt: Runtime, tp: int, elem: int) -> float:
    """A checkpointed block keeps only its input: sequence-sharded under SP."""
    return elem * shape.dim / (tp if rt.sequence_parallel else 1)


def op_saved_bytes_per_token(shape: ModelShape, rt: Runtime, tp: int, elem: int) -> float:
    """What op-level selective checkpointing keeps of a block besides its input, on one TP
    rank (triaxis.parallel.activations.op_save_list): every matmul output -- q, k, v and the
    MLP's inner ones split by tp, wo's and w2's whole (under TP: partial sums before their
    reduce-scatter) -- the fused attention kernel's outputs (its output and fp32 log-sum-exp
    per head) and, under TP, the two reduce-scattered outputs."""
    h, kv, f, a = shape.dim, shape.kv_dim, shape.ffn_dim, shape.n_heads
    inner = (2 if shape.gated_mlp else 1) * f
    saved = elem * ((h + 2 * kv + inner) / tp + 2 * h)
    if rt.flash_attention:
        saved += (elem * h + 4 * a) / tp
    if tp > 1:
        saved += 2 * elem * h / (tp if rt.sequence_parallel else 1)
    return saved


def logits_bytes_per_token(shape: ModelShape, rt: Runtime, tp: int, elem: int) -> float:
    """Logits, their fp32 copy, log-softmax and its gradient (triaxis: torch cross-entropy on
    vocabulary-sharded logits with loss_parallel; the fp32 copy is the logits themselves in
    fp32); Megatron's fused vocab-parallel cross-entropy keeps the logits and one fp32 buffer."""
    extra = ((4 if elem == 2 else 0) + 8) if rt.eager_fp32_kernels else 4
    return (elem + extra) * shape.vocab_size / tp


def loss_bytes(
    shape: ModelShape, rt: Runtime, tp: int, elem: int, tokens: int, whole_head: bool
) -> float:
    """Peak bytes of the LM head's output and the loss for `tokens` tokens. With the runtime's
    fused, chunked head + loss (triaxis when the head is whole on the rank: tp = pp = 1) only
    one chunk's logits live at a time: in `elem`, in fp32 (turned into their gradient in place)
    and the gradient in `elem`. (The head's gradient it accumulates is the buffer the plain
    head's backward allocates as well; neither path counts it here.)"""
    if rt.fused_loss_chunk and whole_head:
        chunk = min(tokens, rt.fused_loss_chunk)
        return (2 * elem + 4) * shape.vocab_size * chunk
    return logits_bytes_per_token(shape, rt, tp, elem) * tokens


def in_flight(layout: Layout, num_micro: int) -> float:
    """Micro-batches whose activations stage 0 holds at its peak, per schedule (in units of one
    micro-batch through the whole stage)."""
    p, m, v = layout.pp, num_micro, layout.virtual_stages
    if p == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(m)
    if layout.schedule == "interleaved-1f1b":
        # Narayanan et al. 2021: p micro-batches of 1/v of the stage, plus the warm-up chunks.
        return min(m, p) * (1 + (p - 1) / (p * v))
    if layout.schedule == "zbv":  # as ZB-H2
        return float(min(m, 2 * p - 1))
    return float(min(m, p))  # 1f1b, interleaved-zb (ZB-H1: 1F1B's peak)


OFFLOADED_CHECKPOINTS_ON_GPU = 2
"""With checkpoint offloading a GPU holds two block inputs: the one being copied out (forward)
or prefetched in (backward), and the one in use."""


def activation_bytes(
    p: Problem, layout: Layout, blocks: int, num_micro: int, last_stage: bool
) -> float:
    """Peak activation bytes on the GPU of a stage with `blocks` blocks."""
    return _activations(
        p,
        layout.tp,
        layout.micro_batch,
        layout.activation_checkpoint,
        layout.ac_every,
        blocks,
        in_flight(layout, num_micro),
        last_stage,
        layout.offload_checkpoints,
        layout.tp == 1 and layout.pp == 1,
    )


def offloaded_checkpoint_bytes(p: Problem, layout: Layout, blocks: int, num_micro: int) -> float:
    """Host bytes one GPU's offloaded block inputs take (0 unless offload_checkpoints)."""
    if not layout.offload_checkpoints:
        return 0.0
    ckpt = checkpoint_bytes_per_token(p.shape, p.runtime, layout.tp, p.elem)
    return blocks * ckpt * layout.micro_batch * p.seq_len * in_flight(layout, num_micro)


@lru_cache(maxsize=65536)
def _activations(
    p: Problem,
    tp: int,
    micro_batch: int,
    ac: str,
    ac_every: int,
    blocks: int,
    in_flight_micro: float,
    last_stage: bool,
    offload_ckpt: bool,
    whole_head: bool,
) -> float:
    s, rt, e = p.shape, p.runtime, p.elem
    tokens = micro_batch * p.seq_len
    loss = loss_bytes(s, rt, tp, e, tokens, whole_head) if last_stage else 0.0
    full = layer_activation_bytes_per_token(s, rt, p.seq_len, tp, e) * tokens
    ckpt = checkpoint_bytes_per_token(s, rt, tp, e) * tokens
    if ac == "full" and offload_ckpt:
        # Not multiplied by the micro-batches in flight: the copies stream through 2 slots.
        return OFFLOADED_CHECKPOINTS_ON_GPU * ckpt + full + loss
    if ac == "full":
        kept, working = blocks * ckpt, full
    elif ac == "op":
        # Every block recomputes its cheap ops, one block at a time in backward.
        kept = blocks * (ckpt + op_saved_bytes_per_token(s, rt, tp, e) * tokens)
        working = full
    elif ac == "selective":
        n_ckpt = blocks // ac_every
        kept = n_ckpt * ckpt + (blocks - n_ckpt) * full
        working = full if n_ckpt else 0.0
    else:
        kept, working = blocks * full, 0.0
    return kept * in_flight_micro + working + loss
