"""The planner's price of a LoRA run (triaxis.parallel.lora): the frozen base keeps its
parameters but has no gradients and no optimizer state; the adapters have all three.

Adapter placement per rank follows the trainer: under TP a column-wise base's A is replicated
and its B sharded on out, a row-wise base's A sharded on in and its B replicated; FSDP then
splits each adapter tensor on dim 0 over dp_shard (as it does every parameter).
"""

from __future__ import annotations

from triaxis.parallel.targets import matches
from triaxis.plan.memory import stage_blocks
from triaxis.plan.problem import LoraPlan, ModelShape
from triaxis.plan.shards import _chunk


def block_linears(shape: ModelShape) -> list[tuple[str, int, int, bool]]:
    """(name in a block, in, out, column-wise under TP) of a block's Linears."""
    d, q, kv, f = shape.dim, shape.n_heads * shape.head_dim, shape.kv_dim, shape.ffn_dim
    mlp = [("feed_forward.w1", d, f, True), ("feed_forward.w2", f, d, False)]
    if shape.gated_mlp:
        mlp.append(("feed_forward.w3", d, f, True))
    attn = [
        ("attention.wq", d, q, True),
        ("attention.wk", d, kv, True),
        ("attention.wv", d, kv, True),
        ("attention.wo", q, d, False),
    ]
    return attn + mlp


def _adapter_local(n_in: int, n_out: int, colwise: bool, rank: int, tp: int, shard: int):
    """Elements of A and B on rank 0 (TP placement, then FSDP's dim-0 split)."""
    a_rows, a_cols = rank, (n_in if colwise else n_in // tp)
    b_rows, b_cols = (n_out // tp if colwise else n_out), rank
    return _chunk(a_rows, shard, 0) * a_cols + _chunk(b_rows, shard, 0) * b_cols


def adapter_numel(
    shape: ModelShape, lora: LoraPlan, tp: int, shard: int, pp: int, stage: int
) -> tuple[int, int]:
    """(adapter elements, adapter tensors) on rank 0 of `stage`."""
    blocks = stage_blocks(shape.n_layers, pp)
    first = sum(blocks[:stage])
    numel = tensors = 0
    for layer in range(first, first + blocks[stage]):
        for name, n_in, n_out, colwise in block_linears(shape):
            if matches(f"layers.{layer}.{name}", list(lora.patterns)):
                numel += _adapter_local(n_in, n_out, colwise, lora.rank, tp, shard)
                tensors += 2
    if stage == pp - 1 and matches("output", list(lora.patterns)):
        numel += _adapter_local(shape.dim, shape.vocab_size, True, lora.rank, tp, shard)
        tensors += 2
    return numel, tensors


def lora_states(
    shape: ModelShape,
    lora: LoraPlan,
    tp: int,
    shard: int,
    pp: int,
    stage: int,
    base_params_bytes: float,
) -> tuple[float, float, float]:
    """(params, grads, optim) bytes: the base's fp32 parameters plus the adapters; gradients
    and AdamW states (two fp32 moments and a 4-byte step per tensor) of the adapters only."""
    numel, tensors = adapter_numel(shape, lora, tp, shard, pp, stage)
    return base_params_bytes + 4.0 * numel, 4.0 * numel, 8.0 * numel + 4.0 * tensors
