"""The global sample order: which window of a split global sample i reads, a pure function of
(seed, i). The sample at global index i is

    epoch = i // num_windows,  window = permute(i % num_windows; seed, epoch)

so the data cursor is one integer, and which rank reads which index never changes what the index
holds.

That global shuffle touches shards all over the split at every step. With `shuffle_shards = N`
the split is cut into blocks of one shard's worth of windows; each epoch the blocks are permuted,
taken N at a time, and the windows of each group of N blocks are permuted among themselves. A
step then reads from N scattered shards (plus the neighbours a block straddles), so a cache of
a few N shards holds what a run needs instead of the whole split; the short tail block (the
windows after the last whole block) comes last in every epoch. Still a pure function of
(seed, i).

Apart from `dataset.py` (where the tokens of a window come from: memory-mapped shards, the
remote cache, loss masks) because the order is integer arithmetic alone, shared by the mixture's
per-source seeds and the synthetic data, and testable without a file.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-distributed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def permute(j: int, n: int, key: int, rounds: int = 4) -> int:
    """A bijection of [0, n) chosen by `key`: a Feistel network over 2^k >= n, cycle-walking.

    O(1) memory for any n, unlike materializing a permutation of billions of windows.
    """
    if n <= 1:
        return 0
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half_bits) - 1
    x = j
    while True:
        left, right = x >> half_bits, x & mask
        for r in range(rounds):
            left, right = right, left ^ (mix64(key ^ (r << 56) ^ right) & mask)
        x = (left << half_bits) | right
        if x < n:
            return x


def window_of(
    index: int,
    num_windows: int,
    seed: int,
    shuffle: bool = True,
    block_windows: int = 1,
    group_blocks: int = 0,
) -> int:
    """The window global sample `index` reads from a split of `num_windows` windows: in order
    without `shuffle`, else keyed by (seed, epoch); with `group_blocks` (data.shuffle_shards),
    under the shard-group shuffle of blocks of `block_windows` windows (module docstring)."""
    epoch, j = divmod(index, num_windows)
    if not shuffle:
        return j
    key = mix64(seed * 1_000_003 + epoch)
    if not group_blocks:
        return permute(j, num_windows, key)
    return _grouped_window(j, key, num_windows, block_windows, group_blocks)


def _grouped_window(j: int, key: int, num_windows: int, b: int, g: int) -> int:
    """Position j of an epoch -> window, under the shard-group shuffle (module docstring): `b`
    windows per block, `g` blocks per group."""
    blocks = num_windows // b
    whole = blocks * b
    if j >= whole:  # the short tail block, last in every epoch
        return whole + permute(j - whole, num_windows - whole, mix64(key ^ 1))
    group, within = divmod(j, g * b)
    in_group = min(g, blocks - group * g)  # the last group may hold fewer blocks
    r = permute(within, in_group * b, mix64(key ^ ((group + 2) << 32)))
    block = permute(group * g + r // b, blocks, mix64(key ^ 2))
    return block * b + r % b
