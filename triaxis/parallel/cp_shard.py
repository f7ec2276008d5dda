"""Head-tail sharding of a sequence over the `cp` (context parallel) axis.

Causal attention makes late tokens expensive (a token attends to everything before it), so cutting
the sequence into cp contiguous pieces would leave the last rank with most of the work. Instead
the sequence is cut into 2*cp equal chunks and rank r holds chunks r and 2*cp-1-r: one cheap
chunk from the head and one expensive chunk from the tail. Chunk i attends to chunks 0..i, so
rank r's queries see (r + 1) + (2*cp - r) = 2*cp + 1 key chunks, the same on every rank
(triaxis.parallel.ring_attention counts it).

Inputs, targets, positions and document ids are all sharded the same way, after document ids and
positions are computed on the whole row (a document may cross any chunk boundary).
"""

from __future__ import annotations

import torch


def head_tail_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The global chunk indices (of 2*cp) that cp rank `rank` holds, in local order."""
    if not 0 <= rank < cp:
        raise ValueError(f"cp rank {rank} is outside a cp group of {cp}")
    return rank, 2 * cp - 1 - rank


def check_divisible(seq_len: int, cp: int) -> None:
    if seq_len % (2 * cp):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp} (head-tail "
            f"chunks); choose a sequence length that is a multiple of {2 * cp}"
        )


def shard_head_tail(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """x's slice along `dim` (the sequence) held by cp rank `rank`: chunks r and 2cp-1-r."""
    if cp == 1:
        return x
    check_divisible(x.shape[dim], cp)
    chunks = x.chunk(2 * cp, dim=dim)
    head, tail = head_tail_chunks(cp, rank)
    return torch.cat([chunks[head], chunks[tail]], dim=dim)


def unshard_head_tail(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The whole sequence from every cp rank's shard (rank order): the inverse of
    shard_head_tail, for tests and gathering outputs."""
    cp = len(shards)
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank, shard in enumerate(shards):
        head, tail = head_tail_chunks(cp, rank)
        chunks[head], chunks[tail] = shard.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def head_tail_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """(seq_len / cp,) global token index of each local token of cp rank `rank`."""
    return shard_head_tail(torch.arange(seq_len, device=device), cp, rank, dim=0)
