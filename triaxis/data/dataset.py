"""One split of prepared data: memory-mapped (or cached s3://) token shards, read in the global
sample order.

A sample is seq_len + 1 consecutive tokens of the concatenated split (inputs and shifted targets).
Window w covers tokens [w·seq_len, w·seq_len + seq_len + 1). Which window global sample i reads
is a pure function of (seed, i) (`sample_order.py`, with the shard-group shuffle of
`shuffle_shards`): the data cursor is one integer, and which rank reads which index never
changes what the index holds. That makes resume exact under any data-parallel size.

A split packed by `prepare --pack-seq-len` holds whole examples in windows of seq_len + 1 tokens
written back to back: window w is then tokens [w·(seq_len + 1), (w + 1)·(seq_len + 1)), and
nothing else changes (packing.py says why packing happens at prepare time).

A split prepared with a loss mask (`prepare --format chat`) has a `.mask` file beside each
shard, one byte per token; `inputs_targets` gives the targets of masked tokens as -100
(IGNORE_INDEX, which every loss path honours), so only assistant / completion tokens are trained on.

Local shards are memory-mapped. Shards under s3:// are read through a bounded local cache with
background prefetch (`remote.py`); where bytes come from never changes what sample i holds.

Debugging: with TRIAXIS_TRACE_SAMPLES=FILE in the environment, every `batch` call appends one
line "SPLIT START COUNT" to FILE (all processes append to the same file), the sample ids a run
consumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from triaxis import storage
from triaxis.data import sample_order
from triaxis.data.format import FORMAT, MANIFEST, MASK_DTYPE, check_seq_len, packed_seq_len
from triaxis.data.tokenizer import load_tokenizer
from triaxis.data.verify import (
    VERIFY_MODES,
    check_manifest,
    check_shard_size,
    verify_mask,
    verify_shard,
)
from triaxis.errors import UserError

TRACE_ENV = "TRIAXIS_TRACE_SAMPLES"


def read_manifest(path: str | Path) -> dict:
    if storage.is_remote(path):
        mf = storage.join(str(path), MANIFEST)
        try:
            text = storage.read_bytes(mf).decode()
        except FileNotFoundError:
            raise UserError(
                f"data path {path} has no {MANIFEST}: it is not prepared data or the "
                f"prefix is wrong. Run `triaxis prepare --output {path}`"
            ) from None
    else:
        folder = Path(path)
        if not folder.exists():
            raise UserError(
                f"data path {path} does not exist; run `triaxis prepare --output "
                f"{path}` first, or set data.path"
            )
        mf = folder / MANIFEST
        if not mf.is_file():
            raise UserError(
                f"data path {path} has no {MANIFEST}; it is not prepared data. "
                f"Run `triaxis prepare --output {path}`"
            )
        text = mf.read_bytes().decode("utf-8", errors="replace")
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise UserError(
            f"{mf} is not valid JSON ({e}): the manifest is damaged; prepare the data again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(
            f"{mf} has format {found!r}, expected {FORMAT!r}; "
            "prepare the data again with this triaxis version"
        )
    check_manifest(manifest, str(mf))
    return manifest


class EmptySplitError(UserError):
    """The split holds too few tokens for one sample (a run may go on without validation)."""


class TokenDataset:
    """One split of prepared data: local shards memory-mapped read-only, each checked against
    the manifest when opened (size always; sha256 and token range once per file unless
    verify="size": verify.py), s3:// shards through a local cache of at most `cache_gib`, each
    download checked against its sha256 (remote.py)."""

    def __init__(
        self,
        path: str | Path,
        split: str,
        seq_len: int,
        seed: int = 0,
        verify: bool | str = "sha256",
        cache_dir: str = "",
        cache_gib: float = 4.0,
        prefetch_threads: int = 4,
        shuffle_shards: int = 0,
    ):
        verify = {True: "sha256", False: "size"}.get(verify, verify)  # type: ignore[arg-type]
        if verify not in VERIFY_MODES:
            raise UserError(f"data.verify={verify!r} is not one of {list(VERIFY_MODES)}")
        self.path, self.split = str(path), split
        self.remote = storage.is_remote(self.path)
        self.manifest = read_manifest(path)
        self.seq_len, self.seed = seq_len, seed
        info = self.manifest["splits"].get(split)
        if info is None or info["tokens"] == 0:
            raise EmptySplitError(
                f"data path {path} has no {split!r} tokens; prepare more text or "
                "set a non-zero --val-fraction"
            )
        dtype = np.dtype(self.manifest["dtype"])
        self.shards: list[np.ndarray] = []
        self.cache = None
        self.has_loss_mask = "loss_mask" in self.manifest
        self.masks: list[np.ndarray] = []
        self.mask_cache = None
        if self.remote:
            self.cache = self._remote_cache(info, dtype, cache_dir, cache_gib, prefetch_threads)
            if self.has_loss_mask:
                self.mask_cache = self._remote_cache(
                    info, np.dtype(MASK_DTYPE), cache_dir, cache_gib, prefetch_threads, "mask_"
                )
            sizes = [s["tokens"] for s in info["shards"]]
        else:
            self.folder = Path(path)
            self.shards = [self._map_local(s, dtype, verify) for s in info["shards"]]
            if self.has_loss_mask:
                self.masks = [self._map_mask(s, verify) for s in info["shards"]]
            sizes = [s.size for s in self.shards]
        self.shard_tokens = sizes
        self.offsets = np.cumsum([0] + sizes)
        self.num_tokens = int(self.offsets[-1])
        check_seq_len(self.manifest, seq_len, self.path)
        # A packed split holds whole windows of seq_len + 1 tokens back to back (packing.py).
        self.packed = packed_seq_len(self.manifest) > 0
        self.stride = seq_len + 1 if self.packed else seq_len
        if self.packed:
            self.num_windows = self.num_tokens // self.stride
        else:
            self.num_windows = (self.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise EmptySplitError(
                f"split {split!r} of {path} has {self.num_tokens} tokens, "
                f"fewer than one sample of data.seq_len={seq_len} + 1; lower "
                "data.seq_len or prepare more text"
            )
        if shuffle_shards < 0:
            raise UserError(
                f"data.shuffle_shards={shuffle_shards} must be >= 0 (0 = one global shuffle)"
            )
        self.group_blocks = shuffle_shards
        self.block_windows = max(1, max(sizes) // self.stride)
        if shuffle_shards and self.cache is not None:
            self._check_cache_holds_groups(shuffle_shards, dtype, cache_gib)

    def _map_local(self, shard: dict, dtype: np.dtype, verify: str) -> np.ndarray:
        f = self.folder / shard["file"]
        check_shard_size(f, shard["tokens"], dtype.itemsize)
        if verify == "sha256":
            verify_shard(f, shard["sha256"], dtype, self.manifest["tokenizer"]["vocab_size"])
        if shard["tokens"] == 0:
            return np.zeros(0, dtype)  # an empty file cannot be memory-mapped
        return np.memmap(f, dtype=dtype, mode="r")

    def _map_mask(self, shard: dict, verify: str) -> np.ndarray:
        f = self.folder / shard["mask_file"]
        check_shard_size(f, shard["tokens"], 1)
        if verify == "sha256":
            verify_mask(f, shard["mask_sha256"])
        if shard["tokens"] == 0:
            return np.zeros(0, MASK_DTYPE)
        return np.memmap(f, dtype=MASK_DTYPE, mode="r")

    def _remote_cache(
        self,
        info: dict,
        dtype: np.dtype,
        cache_dir: str,
        cache_gib: float,
        threads: int,
        key: str = "",
    ):
        from triaxis.data.remote import ShardCache

        if cache_gib <= 0:
            raise UserError(
                f"data.cache_gib={cache_gib} must be > 0: remote shards are read "
                "through a local cache of that size"
            )
        files = [s[key + "file"] for s in info["shards"]]
        present = set(storage.listdir(self.path))  # one listing finds a missing shard now
        missing = [f for f in files if f not in present]
        if missing:
            raise UserError(
                f"shard {storage.join(self.path, missing[0])} listed in the manifest "
                f"is missing ({len(missing)} of {len(files)}); prepare the data "
                f"again (triaxis prepare --output {self.path})"
            )
        return ShardCache(
            self.path,
            files,
            [s["tokens"] * dtype.itemsize for s in info["shards"]],
            [s[key + "sha256"] for s in info["shards"]],
            dtype,
            cache_dir,
            int(cache_gib * 2**30),
            threads,
        )

    def tokenizer(self):
        return load_tokenizer(self.path, self.manifest["tokenizer"])

    def _shard(self, s: int) -> np.ndarray:
        return self.cache.get(s) if self.cache is not None else self.shards[s]

    def _shard_of(self, pos: int) -> int:
        return int(np.searchsorted(self.offsets, pos, side="right")) - 1

    def _mask_shard(self, s: int) -> np.ndarray:
        return self.mask_cache.get(s) if self.mask_cache is not None else self.masks[s]

    def _tokens(self, start: int, count: int, mask: bool = False) -> np.ndarray:
        """`count` tokens (or their loss-mask bytes) of the concatenated split from `start`
        (may span shards)."""
        out, pos = [], start
        shard = self._mask_shard if mask else self._shard
        while count > 0:
            s = self._shard_of(pos)
            local = pos - int(self.offsets[s])
            take = min(count, self.shard_tokens[s] - local)
            out.append(shard(s)[local : local + take])
            pos, count = pos + take, count - take
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])

    def shards_of(self, indices, shuffle: bool = True) -> list[int]:
        """The shards samples `indices` touch, without repeats, in first-use order."""
        seen: dict[int, None] = {}
        for i in indices:
            first = self.window_of(i, shuffle) * self.stride
            for s in range(self._shard_of(first), self._shard_of(first + self.seq_len) + 1):
                seen[s] = None
        return list(seen)

    def prefetch(
        self, start_index: int, count: int, micro_batch: int = 0, dp_size: int = 1, dp_rank: int = 0
    ) -> None:
        """Start downloading, in the background, the shards that samples start_index ..
        start_index + count - 1 touch. With micro_batch and dp_size, only this data-parallel
        rank's share of them (the slices micro_batch_start gives it; start_index must be a
        step's cursor or a later step's). Local data needs none: a no-op."""
        if self.cache is None:
            return
        indices = range(start_index, start_index + count)
        if micro_batch and dp_size > 1:
            indices = [i for i in indices if (i - start_index) // micro_batch % dp_size == dp_rank]
        shards = self.shards_of(indices)
        self.cache.prefetch(shards)
        if self.mask_cache is not None:
            self.mask_cache.prefetch(shards)

    def close(self) -> None:
        """Stop prefetching and remove the local cache of remote shards (also done at exit)."""
        for cache in (self.cache, self.mask_cache):
            if cache is not None:
                cache.close()

    def _check_cache_holds_groups(self, groups: int, dtype: np.dtype, cache_gib: float) -> None:
        # A group of N blocks touches up to 2N shards; the trainer prefetches the next step's,
        # which may open the next group.
        need = 4 * groups * max(self.shard_tokens) * dtype.itemsize
        if cache_gib * 2**30 < need:
            raise UserError(
                f"data.shuffle_shards={groups} reads up to {2 * groups} shards at a "
                f"time, and the next group is prefetched: {need / 2**30:.3g} GiB, "
                f"over data.cache_gib={cache_gib:.3g}; raise data.cache_gib to "
                f"{need / 2**30:.3g} or lower data.shuffle_shards"
            )

    def window_of(self, index: int, shuffle: bool = True) -> int:
        """The window global sample `index` reads (sample_order.py)."""
        return sample_order.window_of(
            index, self.num_windows, self.seed, shuffle, self.block_windows, self.group_blocks
        )

    def sample(self, index: int, shuffle: bool = True) -> np.ndarray:
        """The seq_len + 1 tokens of global sample `index`."""
        w = self.window_of(index, shuffle)
        return self._tokens(w * self.stride, self.seq_len + 1)

    def batch(self, start: int, count: int, shuffle: bool = True):
        """Samples start .. start+count-1 as an int64 tensor (count, seq_len + 1)."""
        import torch

        trace = os.environ.get(TRACE_ENV)
        if trace:
            with open(trace, "a") as f:  # one short append: atomic across processes
                f.write(f"{self.split} {start} {count}\n")
        rows = [self.sample(i, shuffle).astype(np.int64) for i in range(start, start + count)]
        return torch.from_numpy(np.stack(rows))

    def loss_mask_of(self, index: int, shuffle: bool = True) -> np.ndarray:
        """The loss-mask bytes of global sample `index`'s targets (its tokens 1 .. seq_len)."""
        return self._tokens(self.window_of(index, shuffle) * self.stride + 1, self.seq_len, True)

    def inputs_targets(self, start: int, count: int, shuffle: bool = True):
        """(inputs, targets), each (count, seq_len) int64: `batch` split into the model's input
        and its next tokens, a target being IGNORE_INDEX where the loss mask says 0."""
        return inputs_targets(self, start, count, shuffle)


def has_loss_mask(ds) -> bool:
    """Whether some targets of `ds` are masked: a TokenDataset prepared with a loss mask, or a
    mixture (anything with `sources`) holding one."""
    return any(getattr(d, "has_loss_mask", False) for d in [ds, *getattr(ds, "sources", [])])


def inputs_targets(ds, start: int, count: int, shuffle: bool = True):
    """(inputs, targets) of samples start .. start+count-1 of any dataset (`batch` split into
    the model's input and its next tokens); where a loss mask says 0, the target is
    IGNORE_INDEX. A mixture's samples take their masks from their own source (`locate`)."""
    tokens = ds.batch(start, count, shuffle)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if not has_loss_mask(ds):
        return inputs, targets
    import torch

    from triaxis.model.loss import IGNORE_INDEX  # what every loss path skips

    targets = targets.clone()
    for row, i in enumerate(range(start, start + count)):
        src, k = ds.locate(i) if hasattr(ds, "sources") else (ds, i)
        if not isinstance(src, TokenDataset):
            src = ds.sources[src]
        if src.has_loss_mask:
            targets[row][torch.from_numpy(src.loss_mask_of(k, shuffle) == 0)] = IGNORE_INDEX
    return inputs, targets


def micro_batch_start(
    cursor: int, micro_step: int, micro_batch: int, dp_size: int, dp_rank: int
) -> int:
    """First global sample index of one rank's micro-batch.

    A step consumes global_batch = micro_batch · grad_accum · dp_size consecutive indices from the
    cursor; micro-step m takes the m-th slice of micro_batch · dp_size, split across dp ranks.
    One process with dp_size=1 and micro_batch · dp_size samples per micro-step therefore sees
    exactly the same samples per micro-step as the sharded layout.
    """
    return cursor + micro_step * micro_batch * dp_size + dp_rank * micro_batch
