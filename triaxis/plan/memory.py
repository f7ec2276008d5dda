"""Peak memory per GPU of a layout: states, activations, communication buffers.

Activations: triaxis.plan.activations (Korthikanti et al. 2022, term by term).

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
from triaxis.plan.activations import activation_bytes, in_flight, offloaded_checkpoint_bytes
from triaxis.plan.expert_memory import (
    dense_mlp_params,
    moe_activation_delta_per_token,
    moe_block_delta,
    moe_blocks_of_stage,
    moe_gathered_params,
)
from triaxis.plan.problem import Layout, MemoryBreakdown, Problem
from triaxis.plan.shards import _local_numel

ADAM_STEP_BYTES = 4


def block_tensors(
    dim: int,
    n_kv: int,
    head_dim: int,
    ffn: int,
    mlp_matrices: int = 3,
    n_heads: int = 0,
    qk_norm: bool = False,
):
    """(rows, cols, tp_dim) of every parameter of one block. n_heads = 0: n_heads x head_dim
    = dim (the usual heads; Qwen3's are wider)."""
    kv, q = n_kv * head_dim, (n_heads * head_dim if n_heads else dim)
    out = [(dim, 1, None), (q, dim, 0), (kv, dim, 0), (kv, dim, 0), (dim, q, 1), (dim, 1, None)]
    if qk_norm:
        out += [(head_dim, 1, None), (head_dim, 1, None)]
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
    n_heads: int = 0,
    qk_norm: bool = False,
) -> tuple[int, int]:
    """(elements, tensors) of one rank of `stage` after TP then FSDP sharding, every block
    dense; rank 0 of the stage by default, which holds the largest shard (= every rank's padded
    FSDP allocation). `blocks_per_stage` overrides the even split (e.g. a partitioner's)."""

    def local(r, c, d):
        return _local_numel(r, c, d, tp, shard, tp_index, shard_index)

    blk = block_tensors(dim, n_kv, head_dim, ffn, mlp_matrices, n_heads, qk_norm)
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


def stage_numel(
    a,
    tp: int,
    shard: int,
    pp: int,
    stage: int,
    ep: int = 1,
    tp_index: int = 0,
    shard_index: int = 0,
    split: tuple[int, ...] | None = None,
) -> tuple[int, int]:
    """(elements, tensors) of a rank of `stage` for a ModelArgs or ModelShape `a`: its blocks
    as dense ones, plus what each MoE block among them holds beyond (expert_memory)."""
    numel, tensors = stage_local_params(
        a.dim, a.n_layers, a.n_kv_heads, a.head_dim, a.ffn_dim, a.vocab_size,
        a.tie_embeddings, a.mlp_matrices, tp, shard, pp, stage, tp_index, shard_index, split,
        a.n_heads, a.qk_norm,
    )  # fmt: skip
    if a.n_experts:
        blocks = split or stage_blocks(a.n_layers, pp)
        moe = moe_blocks_of_stage(a, blocks, stage)
        d_numel, d_tensors = moe_block_delta(a, tp, shard, ep, tp_index, shard_index)
        numel, tensors = numel + moe * d_numel, tensors + moe * d_tensors
    return numel, tensors


def gathered_block_params(a, tp: int, ep: int = 1) -> float:
    """Elements of the largest block one tp rank holds gathered (FSDP's compute copy)."""
    blk = block_tensors(
        a.dim, a.n_kv_heads, a.head_dim, a.ffn_dim, a.mlp_matrices, a.n_heads, a.qk_norm
    )
    dense = sum(_local_numel(r, c, d, tp, 1) for r, c, d in blk)
    return dense + moe_unit_extra(a, tp, ep)


def moe_unit_extra(a, tp: int, ep: int) -> float:
    """How much more an MoE block's gathered feed-forward holds than its dense twin's MLP on
    one tp rank (0 for a dense model, or where the dense MLP is the larger)."""
    if not a.n_experts:
        return 0.0
    return max(0.0, moe_gathered_params(a, ep) - dense_mlp_params(a, tp))


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
    ep: int = 1,
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

    MoE blocks (model_args.n_experts) hold their experts split over `ep` of the dp_shard ranks
    (triaxis.plan.expert_memory).

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
        index = shard_index if fsdp_shard > 1 else 0
        numel, tensors = stage_numel(a, tp, fsdp_shard, pp, s, ep, tp_index, index, split)
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
            per_block = gathered_block_params(a, tp, ep)
            root = _local_numel(a.vocab_size, a.dim, 0, tp, 1) * (1 if a.tie_embeddings else 2)
            blocks = (split or stage_blocks(a.n_layers, pp))[s]
            out["bf16_working"] = 2 * (min(2, blocks) * per_block + root)
        if not best or out["total"] > best["total"]:
            best = out
    return best


# ---------------------------------------------------------------------------------------------
# States, buffers and the peak per GPU (activations: triaxis.plan.activations)


@lru_cache(maxsize=65536)
def _states(
    p: Problem,
    tp: int,
    shard: int,
    pp: int,
    stage: int,
    fsdp_on: bool,
    gathered_blocks: int,
    ep: int = 1,
) -> tuple[float, float, float, float]:
    """(params, grads, optim, comm buffers) bytes of rank 0 of `stage`."""
    s, rt, e = p.shape, p.runtime, p.elem
    numel, tensors = stage_numel(s, tp, shard, pp, stage, ep)
    last = stage == pp - 1
    matrix = s.vocab_size * s.dim / tp
    head = matrix if last else 0.0
    # The root FSDP group: embedding (stage 0) and head (last stage), one matrix if tied.
    root = matrix * (stage == 0) + (0.0 if (s.tie_embeddings and stage == 0) else head)
    if fsdp_on:
        params, grads, optim = 4.0 * numel, 4.0 * numel, 8.0 * numel + 4 * tensors
        # Gathered compute copies: 2 units (current + prefetched), or every block of the stage
        # when kept from forward to backward; the root stays gathered all step.
        unit = s.block_params() / tp + moe_unit_extra(s, tp, ep)
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


def moe_activation_bytes(p: Problem, layout: Layout, moe_blocks: int, num_micro: int) -> float:
    """What `moe_blocks` MoE blocks keep beyond their dense twins (activation_bytes counts
    those): the blocks whose activations stay (not checkpointed; op-level counted as kept), for
    every micro-batch in flight, plus one being recomputed in backward."""
    ac = layout.activation_checkpoint
    kept = {"full": 0, "selective": moe_blocks - moe_blocks // layout.ac_every}.get(ac, moe_blocks)
    per_mb = moe_activation_delta_per_token(p.shape, layout.tp, p.elem) * (
        layout.micro_batch * p.seq_len
    )
    return per_mb * (kept * in_flight(layout, num_micro) + (ac in ("full", "selective")))


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
        params, grads, optim, comm = _states(p, tp, shard, pp, stage, fsdp_on, gathered, layout.ep)
        if p.lora is not None:  # frozen base: gradients and AdamW states of adapters only
            from triaxis.plan.lora import lora_states

            params, grads, optim = lora_states(p.shape, p.lora, tp, shard, pp, stage, params)
        moe = moe_blocks_of_stage(p.shape, blocks, stage) if p.shape.n_experts else 0
        if piped_fsdp:
            comm += p.runtime.grad_reduce_bytes * (
                blocks[stage] * p.shape.block_params() / tp
                + moe * moe_unit_extra(p.shape, tp, layout.ep)
            )
        act = activation_bytes(p, layout, blocks[stage], num_micro, stage == pp - 1)
        if moe:
            act = max(0.0, act + moe_activation_bytes(p, layout, moe, num_micro))
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
