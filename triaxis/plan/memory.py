"""Peak memory per GPU of a layout: states, activations, communication buffers.

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

States (parameters, gradients, AdamW) are counted exactly, modelled on what
triaxis.parallel.parallelize does, tensor by tensor:

  * tensor parallel (DTensor): wq, wk, wv, w1, w3 and the LM head are column-wise (dim 0 split
    by tp), wo and w2 row-wise (dim 1 split by tp), the embedding is split on the vocabulary
    (dim 0), the RMSNorm weights are replicated;
  * FSDP2 then splits dim 0 of each (TP-local) tensor over dp_shard, padded to a multiple of
    dp_shard: every rank allocates ceil(dim0 / dp_shard) rows. dp_replicate copies, never splits.
    FSDP is on only when dp_replicate x dp_shard > 1 (as in ParallelDims.fsdp_enabled);
  * gradients have their parameter's local shape -- except, with TP and no FSDP, the untied
    vocabulary-sharded embedding, whose gradient DTensor's embedding backward returns
    replicated: full size on every TP rank (measured; FSDP's reduce-scatter re-shards it, and a
    tied weight gets the head's sharded gradient);
  * AdamW keeps exp_avg and exp_avg_sq of the parameter's local shape plus a 4-byte `step`
    scalar per parameter tensor;
  * pipeline stages (pp > 1) hold contiguous blocks, the first n_layers % pp stages one more;
    stage 0 holds the embedding, the last stage the final norm and the head (with tied
    embeddings the last stage keeps its own copy of the shared matrix, as Megatron does).

The figures are those of rank 0 of a stage, which holds the largest (padded) shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from triaxis.model.args import ModelArgs
from triaxis.plan.problem import Layout, MemoryBreakdown, ModelShape, Problem, Runtime

ADAM_STEP_BYTES = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk(n: int, parts: int, index: int) -> int:
    """Length of torch.chunk(n, parts)[index] (empty past the end), as DTensor and FSDP2 split."""
    size = _cdiv(n, parts)
    return max(0, min(size, n - index * size))


def _local_numel(
    rows: int,
    cols: int,
    tp_dim: int | None,
    tp: int,
    shard: int,
    tp_index: int = 0,
    shard_index: int = 0,
) -> int:
    """Elements of a (rows, cols) weight (cols = 1 for a vector) on the rank at (tp_index,
    shard_index): TP splits dim tp_dim, then FSDP splits dim 0 of the TP-local tensor."""
    if tp_dim == 0:
        rows = _chunk(rows, tp, tp_index)
    elif tp_dim == 1:
        cols = _chunk(cols, tp, tp_index)
    return _chunk(rows, shard, shard_index) * cols


def block_tensors(dim: int, n_kv: int, head_dim: int, ffn: int, mlp_matrices: int = 3):
    """(rows, cols, tp_dim) of every parameter of one block."""
    kv = n_kv * head_dim
    out = [(dim, 1, None), (dim, dim, 0), (kv, dim, 0), (kv, dim, 0), (dim, dim, 1), (dim, 1, None)]
    if mlp_matrices == 3:
        out += [(ffn, dim, 0), (ffn, dim, 0), (dim, ffn, 1)]
    else:
        out += [(ffn, dim, 0), (dim, ffn, 1)]
    return out


@lru_cache(maxsize=4096)
def stage_blocks(n_layers: int, pp: int) -> tuple[int, ...]:
    """Blocks per pipeline stage: contiguous, the first n_layers % pp stages take one more."""
    base, extra = divmod(n_layers, pp)
    return tuple(base + (1 if s < extra else 0) for s in range(pp))


@lru_cache(maxsize=4096)
def stage_local_params(
    dim: int,
    n_layers: int,
    n_kv: int,
    head_dim: int,
    ffn: int,
    vocab: int,
    tied: bool,
    mlp_matrices: int,
    tp: int,
    shard: int,
    pp: int,
    stage: int,
    tp_index: int = 0,
    shard_index: int = 0,
    blocks_per_stage: tuple[int, ...] | None = None,
) -> tuple[int, int]:
    """(elements, tensors) of one rank of `stage` after TP then FSDP sharding; rank 0 of the
    stage by default, which holds the largest shard (= every rank's padded FSDP allocation).
    `blocks_per_stage` overrides the even split (e.g. a partitioner's)."""

    def local(r, c, d):
        return _local_numel(r, c, d, tp, shard, tp_index, shard_index)

    blk = block_tensors(dim, n_kv, head_dim, ffn, mlp_matrices)
    per_block = sum(local(r, c, d) for r, c, d in blk)
    blocks = (blocks_per_stage or stage_blocks(n_layers, pp))[stage]
    numel, tensors = per_block * blocks, len(blk) * blocks
    first, last = stage == 0, stage == pp - 1
    if first:
        numel, tensors = numel + local(vocab, dim, 0), tensors + 1
    if last:
        numel, tensors = numel + local(dim, 1, None), tensors + 1  # final norm
        if not tied or not first:  # a separate head, or a tied one on its own stage
            numel, tensors = numel + local(vocab, dim, 0), tensors + 1
    return numel, tensors


def replicated_embedding_grad(
    vocab: int, dim: int, tied: bool, tp: int, fsdp: bool, first_stage: bool, tp_index: int = 0
) -> int:
    """Extra gradient elements of the embedding whose gradient comes back replicated (TP
    without FSDP, untied), over its sharded size."""
    if tp == 1 or fsdp or tied or not first_stage:
        return 0
    return vocab * dim - _local_numel(vocab, dim, 0, tp, 1, tp_index)


def predict_state_bytes_per_rank(
    model_args: ModelArgs,
    dp_shard: int,
    dp_replicate: int,
    tp: int,
    pp: int,
    fp32: bool = True,
    *,
    stage: int | None = None,
    rank: int | None = None,
    blocks_per_stage: Sequence[int] | None = None,
) -> dict[str, int]:
    """Bytes per rank of parameters, gradients and AdamW states under triaxis's sharding.

    Parameters and gradients are fp32 either way (FSDP's mixed precision keeps fp32 masters and
    reduces in fp32). `fp32=False` adds `bf16_working`: the bf16 copies FSDP gathers for compute
    (current and prefetched block, plus the root's embedding and head).

    Which rank: by default rank 0 of the heaviest stage (`stage` picks another stage). Rank 0
    holds the largest shard, and its size is also what every rank allocates for FSDP's padded
    parameters. `rank` (a global rank, mesh order pp x dp_replicate x dp_shard x tp) gives that
    rank's own local tensors instead: with dims not divisible by dp_shard the last shards are
    shorter (torch.chunk), which is what summing `to_local()` sizes measures.

    Pipeline stages split the blocks evenly (the first n_layers % pp stages take one more)
    unless `blocks_per_stage` gives the split (one count per stage, summing to n_layers).

    Returns params, grads, optim (exp_avg + exp_avg_sq + a 4-byte step per tensor) and total.
    """
    a = model_args
    split = tuple(blocks_per_stage) if blocks_per_stage is not None else None
    if split is not None and (len(split) != pp or sum(split) != a.n_layers):
        raise ValueError(
            f"blocks_per_stage={list(split)} must have pp={pp} entries summing "
            f"to n_layers={a.n_layers}"
        )
    fsdp_shard = dp_shard if dp_shard * dp_replicate > 1 else 1
    tp_index = shard_index = 0
    stages = range(pp) if stage is None else [stage]
    if rank is not None:
        tp_index, rest = rank % tp, rank // tp
        shard_index = rest % dp_shard
        stages = [rank // (tp * dp_shard * dp_replicate)]
    best: dict[str, int] = {}
    for s in stages:
        numel, tensors = stage_local_params(
            a.dim,
            a.n_layers,
            a.n_kv_heads,
            a.head_dim,
            a.ffn_dim,
            a.vocab_size,
            a.tie_embeddings,
            3,
            tp,
            fsdp_shard,
            pp,
            s,
            tp_index,
            shard_index if fsdp_shard > 1 else 0,
            split,
        )
        extra = replicated_embedding_grad(
            a.vocab_size,
            a.dim,
            a.tie_embeddings,
            tp,
            fsdp_shard > 1 or dp_replicate > 1,
            s == 0,
            tp_index,
        )
        out = {
            "params": 4 * numel,
            "grads": 4 * (numel + extra),
            "optim": 8 * numel + ADAM_STEP_BYTES * tensors,
        }
        out["total"] = out["params"] + out["grads"] + out["optim"]
        if not fp32:
            blk = block_tensors(a.dim, a.n_kv_heads, a.head_dim, a.ffn_dim)
            per_block = sum(_local_numel(r, c, d, tp, 1) for r, c, d in blk)
            root = _local_numel(a.vocab_size, a.dim, 0, tp, 1) * (1 if a.tie_embeddings else 2)
            blocks = (split or stage_blocks(a.n_layers, pp))[s]
            out["bf16_working"] = 2 * (min(2, blocks) * per_block + root)
        if not best or out["total"] > best["total"]:
            best = out
    return best


# ---------------------------------------------------------------------------------------------
# Activations, buffers and the peak per GPU


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


@lru_cache(maxsize=65536)
def _states(
    p: Problem, tp: int, shard: int, pp: int, stage: int, fsdp_on: bool, gathered_blocks: int
) -> tuple[float, float, float, float]:
    """(params, grads, optim, comm buffers) bytes of rank 0 of `stage`."""
    s, rt, e = p.shape, p.runtime, p.elem
    numel, tensors = stage_local_params(
        s.dim,
        s.n_layers,
        s.n_kv_heads,
        s.head_dim,
        s.ffn_dim,
        s.vocab_size,
        s.tie_embeddings,
        s.mlp_matrices,
        tp,
        shard,
        pp,
        stage,
    )
    last = stage == pp - 1
    matrix = s.vocab_size * s.dim / tp
    head = matrix if last else 0.0
    # The root FSDP group: embedding (stage 0) and head (last stage), one matrix if tied.
    root = matrix * (stage == 0) + (0.0 if (s.tie_embeddings and stage == 0) else head)
    if fsdp_on:
        params, grads, optim = 4.0 * numel, 4.0 * numel, 8.0 * numel + 4 * tensors
        # Gathered compute copies: 2 units (current + prefetched), or every block of the stage
        # when kept from forward to backward; the root stays gathered all step.
        unit = s.block_params() / tp
        if rt.gather_per_matrix:
            unit = max(s.dim, s.ffn_dim) * s.dim / tp  # the largest weight matrix
        comm = e * (gathered_blocks * unit + root)
        # One unit's unsharded gradient + its reduce-scatter input, and the head's gradient.
        comm += (e + rt.grad_reduce_bytes) * unit + e * head
    elif rt.fsdp:
        # One model replica, no FSDP: fp32 states; autocast caches bf16 copies of the weights.
        params, grads, optim = 4.0 * numel, 4.0 * numel, 8.0 * numel + 4 * tensors
        params += 2.0 * numel if e == 2 else 0.0
        grads += 4.0 * replicated_embedding_grad(
            s.vocab_size, s.dim, s.tie_embeddings, tp, False, stage == 0
        )
        comm = 0.0
    else:
        # Megatron-LM 2021: fp16 weights, fp32 main grads, fp32 master + Adam, replicated.
        params, grads, optim, comm = 2.0 * numel, 4.0 * numel, 12.0 * numel, 0.0
    return params, grads, optim, comm


def hierarchical_buffer_bytes(p: Problem, tp: int) -> float:
    """MiCS two-phase gathers (parallel.hierarchical) stage the full buffer of one FSDP group
    once more for the reordering copy: the largest group (a block or the vocabulary matrix),
    gathered in the compute dtype or reduced in grad_reduce_bytes."""
    s = p.shape
    width = max(p.elem, p.runtime.grad_reduce_bytes)
    return width * max(s.block_params(), s.vocab_size * s.dim) / tp


def memory_of(p: Problem, layout: Layout, num_micro: int) -> MemoryBreakdown:
    """Peak bytes per GPU: the heavier of the first and last pipeline stage."""
    fsdp_on = p.runtime.fsdp and layout.dp > 1
    shard = layout.dp_shard if fsdp_on else 1
    tp, pp = layout.tp, layout.pp
    blocks = stage_blocks(p.shape.n_layers, pp)
    # Gathered TP inputs (attention and MLP) of the block in flight.
    tp_buffers = 2 * p.elem * layout.micro_batch * p.seq_len * p.shape.dim if tp > 1 else 0.0
    worst = None
    # torch's pipeline schedules skip FSDP's reshard-after-backward and gradient reduction until
    # the last micro-batch (PipelineStage: set_reshard_after_backward / set_requires_gradient_sync
    # off): a stage's blocks stay gathered and their unsharded gradients accumulate all step.
    piped_fsdp = pp > 1 and fsdp_on
    for stage in (0, pp - 1) if pp > 1 else (0,):
        kept = piped_fsdp or not layout.reshard_after_forward
        gathered = blocks[stage] if kept else 2
        params, grads, optim, comm = _states(p, tp, shard, pp, stage, fsdp_on, gathered)
        if p.lora is not None:  # frozen base: gradients and AdamW states of adapters only
            from triaxis.plan.lora import lora_states

            params, grads, optim = lora_states(p.shape, p.lora, tp, shard, pp, stage, params)
        if piped_fsdp:
            comm += p.runtime.grad_reduce_bytes * blocks[stage] * p.shape.block_params() / tp
        act = activation_bytes(p, layout, blocks[stage], num_micro, stage == pp - 1)
        host = offloaded_checkpoint_bytes(p, layout, blocks[stage], num_micro)
        if layout.cpu_offload:
            host += params + grads + optim
            params = grads = optim = 0.0
        host *= p.hw.gpus_per_node
        if layout.hierarchical and fsdp_on:
            comm += hierarchical_buffer_bytes(p, tp)
        mem = MemoryBreakdown(params, grads, optim, act, comm + tp_buffers, host)
        if worst is None or mem.total > worst.total:
            worst = mem
    assert worst is not None
    return worst
