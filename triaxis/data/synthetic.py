"""Synthetic data for benchmarks (`data.path = "synthetic"`): uniform random tokens, no files,
no tokenizer. Apart from `dataset.py` (prepared shards on disk or s3://) because it shares
nothing with them but the shape of a sample and the rule that sample i is a pure function of
(seed, i).
"""

from __future__ import annotations

import numpy as np

from triaxis.data.sample_order import mix64

SYNTHETIC = "synthetic"


class SyntheticDataset:
    """Uniform random tokens for benchmarks (`data.path = "synthetic"`): no files, no tokenizer.
    Sample i is still a pure function of (seed, i)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.num_windows = 2**62
        self.manifest = {"tokenizer": {"kind": SYNTHETIC, "vocab_size": vocab_size}}

    def _tokens(self, start: int, count: int) -> np.ndarray:
        # Token t of sample i hashes (seed, i, t) with splitmix64, a whole batch in a few numpy
        # passes: a generator per sample cost more than 1% of a small model's step.
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
            idx = np.arange(start, start + count, dtype=np.uint64)[:, None]
            pos = np.arange(self.seq_len + 1, dtype=np.uint64)[None, :]
            x = idx * np.uint64(self.seq_len + 1) + pos
            x ^= np.uint64(mix64(self.seed))
            x += np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
        return (x % np.uint64(self.vocab_size)).astype(np.int64)

    def sample(self, index: int, shuffle: bool = True) -> np.ndarray:
        return self._tokens(index, 1)[0]

    def batch(self, start: int, count: int, shuffle: bool = True):
        import torch

        return torch.from_numpy(self._tokens(start, count))
