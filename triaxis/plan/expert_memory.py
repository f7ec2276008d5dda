"""What an MoE block changes in a rank's memory, over its dense twin (the same block with a
dense MLP of ffn_dim, which triaxis.plan.memory counts), modelled on triaxis.parallel:

  * under tp the whole MoE feed-forward is replicated (triaxis.parallel.moe_tp): router,
    experts and shared experts are not split by tp, and every tp rank routes the whole
    (gathered) sequence;
  * the experts' three (n_experts, ...) weights are split on dim 0 over ep
    (triaxis.parallel.expert), then FSDP splits the rank's n_experts / ep experts over
    edp = dp_shard / ep, padded as torch.chunk pads (a rank allocates ceil(local / edp)
    experts);
  * the router (n_experts x dim) and the shared experts' SwiGLU are sharded by the block's
    FSDP group (dp_shard) as the dense tensors are.

Activations per token of an MoE block kept for backward (no checkpointing), in place of the dense
MLP's 4 x ffn / tp: the router's fp32 logits and probabilities (2 x 4 x E), and per assignment
(k of them) the dispatched input and the expert output (2 x dim) and the SwiGLU's gate, up,
activation and product (4 x moe_ffn); the shared experts as a dense SwiGLU; whole on every tp
rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from triaxis.plan.shards import _chunk, _local_numel


def moe_blocks_of_stage(shape, blocks_per_stage: Sequence[int], stage: int) -> int:
    """MoE blocks among `stage`'s contiguous blocks (the first moe_first_dense stay dense)."""
    start = sum(blocks_per_stage[:stage])
    return sum(shape.is_moe_layer(i) for i in range(start, start + blocks_per_stage[stage]))


def moe_block_delta(
    shape, tp: int, shard: int, ep: int, tp_index: int = 0, shard_index: int = 0
) -> tuple[int, int]:
    """(elements, tensors) one MoE block holds on the rank at (tp_index, shard_index) beyond
    its dense twin. `shard`: the FSDP group size (dp_shard, or 1 without FSDP)."""
    h, f = shape.dim, shape.ffn_dim
    dense = 2 * _local_numel(f, h, 0, tp, shard, tp_index, shard_index) + _local_numel(
        h, f, 1, tp, shard, tp_index, shard_index
    )
    router = _local_numel(shape.n_experts, h, None, 1, shard, 0, shard_index)
    edp, ep_local = max(1, shard // ep), shape.n_experts // ep
    per_expert = shape.dim * shape.moe_ffn_dim
    experts = 3 * _chunk(ep_local, edp, shard_index // ep if shard > 1 else 0) * per_expert
    tensors = 1  # the router; the three expert weights take the dense MLP's three places
    shared = 0
    if shape.n_shared_experts:
        hs = shape.n_shared_experts * shape.moe_ffn_dim
        shared = 2 * _local_numel(hs, h, None, 1, shard, 0, shard_index) + _local_numel(
            h, hs, None, 1, shard, 0, shard_index
        )
        tensors += 3
    return router + experts + shared - dense, tensors


def moe_gathered_parts(shape, ep: int) -> tuple[int, int]:
    """Elements of one MoE block's feed-forward a rank holds gathered (after FSDP's all-gather),
    whole on every tp rank: (the experts of its ep share, which FSDP shards over edp; the
    router and the shared experts, which it shards over dp_shard)."""
    hs = shape.n_shared_experts * shape.moe_ffn_dim
    experts = 3 * (shape.n_experts // ep) * shape.dim * shape.moe_ffn_dim
    return experts, shape.n_experts * shape.dim + 3 * hs * shape.dim


def moe_gathered_params(shape, ep: int) -> float:
    return sum(moe_gathered_parts(shape, ep))


def dense_mlp_params(shape, tp: int) -> float:
    """The dense twin's MLP on one tp rank (what an MoE block's feed-forward replaces)."""
    return shape.mlp_matrices * shape.dim * shape.ffn_dim / tp


def moe_activation_delta_per_token(shape, tp: int, elem: int) -> float:
    """Bytes per token an MoE block keeps for backward beyond its dense twin (on one tp rank:
    the twin's MLP is split by tp, the MoE block is not)."""
    k, e = shape.moe_top_k, shape.n_experts
    moe = 8 * e + k * elem * (2 * shape.dim + 4 * shape.moe_ffn_dim)
    moe += 4 * elem * shape.n_shared_experts * shape.moe_ffn_dim
    return moe - 4 * elem * shape.ffn_dim / tp
