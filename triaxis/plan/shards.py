"""How DTensor and FSDP2 split one tensor: the element counts every memory figure is built from
(triaxis.plan.memory for the dense model, triaxis.plan.expert_memory for MoE blocks)."""

from __future__ import annotations


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
