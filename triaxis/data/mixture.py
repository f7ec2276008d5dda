"""A weighted mixture of prepared sources (`[[data.sources]]`), read as one global sample order.

Sample i of the mixture is (source s, index k within s), then s's own sample k (its epochs
and keyed permutation, `dataset.TokenDataset`, seeded per source). Both steps are pure
functions of (seed, i): the cursor stays one integer, and resume and a data-parallel change
behave exactly as with one source.

Which source index i goes to (a balanced tree of the sources that splits each node's indices
by weight, with a bound on every window's counts, and the phases that epochs caps and weight
changes at a resume start) is `mixture_order.py`; this module reads the sources in that order
and opens them from the config.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from fractions import Fraction

import numpy as np

from triaxis import storage
from triaxis.config import Config, SourceConfig
from triaxis.data.dataset import TRACE_ENV, EmptySplitError, TokenDataset
from triaxis.data.mixture_order import history_phases, locate_in_tree, phase_counts, window_bound_of
from triaxis.data.sample_order import mix64
from triaxis.data.synthetic import SYNTHETIC
from triaxis.errors import UserError


class MixtureDataset:
    """The train split of every source, read as one global order (module docstring). Offers
    what the trainer asks of a TokenDataset: sample, batch, prefetch, close, manifest."""

    def __init__(
        self,
        sources: list[TokenDataset],
        weights: list[float],
        names: list[str],
        caps: list[int | None],
    ):
        self.sources, self.names = sources, names
        self.caps = caps
        self.labels = list(names)  # a source's identity across a resume: its name or path
        self._set_history([{"start": 0, "weights": list(weights)}])
        self.manifest = sources[0].manifest
        self.seq_len = sources[0].seq_len
        self.window_bound = [window_bound_of(self.phases[0].paths[s]) for s in range(len(sources))]

    def _set_history(self, history: list[dict]) -> None:
        self.history = history
        weights = [Fraction(w) for w in history[-1]["weights"]]
        # Exact shares: a float sum of weights near the float maximum would overflow.
        self.weights = [float(w / sum(weights)) for w in weights]
        self.phases = history_phases(history, self.caps)
        self._starts = [p.start for p in self.phases]
        self.num_samples = self.phases[-1].end  # None: endless

    def state(self) -> dict:
        """What a checkpoint carries so that a resume with other weights continues exactly."""
        return {"sources": self.labels, "caps": self.caps, "history": self.history}

    def restore(self, saved: dict | None, cursor: int) -> str | None:
        """Continue a checkpoint's mixture at `cursor`: the same weights resume as saved; new
        weights start a new phase at the cursor (a line for the log says so). Other sources,
        or other epochs caps, are refused in one line."""
        weights = self.history[-1]["weights"]
        if not saved:  # a checkpoint without a mixture history: only one from step 0 is exact
            if cursor == 0:
                return None
            raise UserError(
                f"the checkpoint (sample cursor {cursor}) holds no data.sources history, so "
                "which samples it trained on is unknown; resume it with the data settings it "
                "was written with, or start a fresh run"
            )
        if saved["sources"] != self.labels or saved["caps"] != self.caps:
            raise UserError(
                f"data.sources changed since the checkpoint (sources {saved['sources']}, epochs "
                f"caps {saved['caps']} samples; now {self.labels}, {self.caps}): only weights may "
                "change across a resume; restore the sources and epochs, or start a fresh run"
            )
        history = [dict(h) for h in saved["history"]]
        if history[-1]["weights"] == weights:
            self._set_history(history)
            return None
        if history[-1]["start"] == cursor:
            history.pop()  # changed again before any sample of the previous phase was used
        self._set_history([*history, {"start": cursor, "weights": list(weights)}])
        return f"data.sources weights changed: a new mixture phase from sample {cursor}"

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample `index` -> (source, sample index within that source)."""
        if self.num_samples is not None and index >= self.num_samples:
            raise UserError(
                f"sample {index} is past the end of the mixture: every source is capped by "
                f"its epochs, {self.num_samples} samples in all; raise an epochs cap"
            )
        phase = self.phases[bisect.bisect_right(self._starts, index) - 1]
        s, k = locate_in_tree(phase.tree, index - phase.start)
        return s, phase.offset[s] + k

    def counts(self, stop: int) -> list[int]:
        """Samples of each source among global samples 0 .. stop-1."""
        return phase_counts(self.phases, stop, len(self.sources))

    def sample(self, index: int, shuffle: bool = True) -> np.ndarray:
        s, k = self.locate(index)
        return self.sources[s].sample(k, shuffle)

    def batch(self, start: int, count: int, shuffle: bool = True):
        """Samples start .. start+count-1 as an int64 tensor (count, seq_len + 1)."""
        import torch

        trace = os.environ.get(TRACE_ENV)
        if trace:
            with open(trace, "a") as f:  # the global ids, as TokenDataset.batch writes them
                f.write(f"train {start} {count}\n")
        rows = [self.sample(i, shuffle).astype(np.int64) for i in range(start, start + count)]
        return torch.from_numpy(np.stack(rows))

    def prefetch(
        self, start_index: int, count: int, micro_batch: int = 0, dp_size: int = 1, dp_rank: int = 0
    ) -> None:
        """TokenDataset.prefetch per source: the s3:// shards this rank's samples touch."""
        if all(ds.cache is None for ds in self.sources):
            return  # local sources: nothing to fetch, no samples to locate
        indices = range(start_index, start_index + count)
        if micro_batch and dp_size > 1:
            indices = [i for i in indices if (i - start_index) // micro_batch % dp_size == dp_rank]
        if self.num_samples is not None:
            indices = [i for i in indices if i < self.num_samples]
        per_source: dict[int, list[int]] = {}
        for i in indices:
            s, k = self.locate(i)
            per_source.setdefault(s, []).append(k)
        for s, ks in per_source.items():
            if self.sources[s].cache is not None:
                self.sources[s].cache.prefetch(self.sources[s].shards_of(ks))

    def close(self) -> None:
        for ds in self.sources:
            ds.close()

    def tokenizer(self):
        return self.sources[0].tokenizer()

    def check_length(self, samples: int) -> None:
        """Refuse a run that needs more samples than a fully capped mixture holds."""
        if self.num_samples is not None and samples > self.num_samples:
            raise UserError(
                f"the mixture holds {self.num_samples} samples (every source has an epochs "
                f"cap) but train.steps x global_batch needs {samples}; raise the epochs "
                "caps, drop one, or lower train.steps"
            )


def mixture_state(train_ds) -> dict:
    """The checkpoint's loop-state entry of a mixture ({} for one source)."""
    return {"mixture": train_ds.state()} if isinstance(train_ds, MixtureDataset) else {}


def resume_mixture(train_ds, loop_state: dict, cursor: int, samples: int, log) -> None:
    """Continue a checkpoint's mixture at `cursor` (MixtureDataset.restore); with new weights,
    log the new phase and check the run still fits a capped mixture."""
    if isinstance(train_ds, MixtureDataset):
        note = train_ds.restore(loop_state.get("mixture"), cursor)
        if note:
            log.info(note)
            train_ds.check_length(samples)


def source_seed(seed: int, index: int) -> int:
    """Each source's own order seed: distinct per source, a pure function of data.seed."""
    return mix64(seed ^ ((index + 1) << 40)) >> 2


def _tokenizer_identity(ds: TokenDataset) -> tuple:
    """What must agree between sources: dtype, vocabulary, end-of-document id, and the tokenizer
    file's content (parsed: the same tokenizer saved by bpe and by hf:PATH compares equal)."""
    info = ds.manifest["tokenizer"]
    digest = ""
    if info.get("file"):
        raw = storage.read_bytes(storage.join(ds.path, info["file"]))
        canonical = json.dumps(json.loads(raw), sort_keys=True).encode()
        digest = hashlib.sha256(canonical).hexdigest()[:12]
    return ds.manifest["dtype"], info["vocab_size"], info.get("eos_id"), digest


def _describe(identity: tuple) -> str:
    dtype, vocab, eos, digest = identity
    file = f", tokenizer.json {digest}" if digest else ", byte tokenizer"
    return f"vocab {vocab}, eos id {eos}, {dtype}{file}"


def _open(cfg: Config, path: str, split: str, seed: int) -> TokenDataset:
    """One prepared split with the data section's reader settings (shard groups: train only)."""
    d = cfg.data
    return TokenDataset(
        path,
        split,
        d.seq_len,
        seed,
        cache_dir=d.cache_dir,
        cache_gib=d.cache_gib,
        shuffle_shards=d.shuffle_shards if split == "train" else 0,
        verify=d.verify,
    )


def _open_source(cfg: Config, src: SourceConfig, i: int, split: str) -> TokenDataset:
    return _open(cfg, src.path, split, source_seed(cfg.data.seed, i))


def open_train_data(cfg: Config) -> TokenDataset | MixtureDataset:
    """The train split data.path or data.sources names (not "synthetic": the caller's)."""
    d = cfg.data
    if not d.sources:
        return _open(cfg, d.path, "train", d.seed)
    opened = [_open_source(cfg, src, i, "train") for i, src in enumerate(d.sources)]
    first = _tokenizer_identity(opened[0])
    for i, ds in enumerate(opened[1:], 1):
        other = _tokenizer_identity(ds)
        if other != first:
            raise UserError(
                f"data.sources[{i}] ({ds.path}: {_describe(other)}) has another tokenizer than "
                f"data.sources[0] ({opened[0].path}: {_describe(first)}); a mixture needs one "
                "tokenizer: prepare every source with the same --tokenizer (hf:PATH, byte, or "
                "the first source's tokenizer.json)"
            )
    caps: list[int | None] = []
    for i, (src, ds) in enumerate(zip(d.sources, opened)):
        if src.epochs is None:
            caps.append(None)
            continue
        cap = int(src.epochs * ds.num_windows)
        if cap < 1:
            raise UserError(
                f"data.sources[{i}].epochs={src.epochs} of {ds.num_windows} windows is no whole "
                f"sample; raise epochs to at least {1 / ds.num_windows:.3g} or drop the cap"
            )
        caps.append(cap)
    ds = MixtureDataset(opened, [s.weight for s in d.sources], [s.label() for s in d.sources], caps)
    ds.check_length(cfg.train.steps * cfg.train.global_batch)
    return ds


def open_val_sets(cfg: Config, warn=None) -> dict[str, TokenDataset]:
    """Validation splits: {"": data.path's} or {name: each source's}; a source without one is
    left out (`warn` says so), "synthetic" has none."""
    d = cfg.data
    named = [("", d.path, None)] if not d.sources else []
    named += [(src.label(), src.path, (src, i)) for i, src in enumerate(d.sources)]
    out: dict[str, TokenDataset] = {}
    for name, path, source in named:
        if path == SYNTHETIC:
            continue
        try:
            if source is None:
                out[name] = _open(cfg, path, "val", d.seed)
            else:
                out[name] = _open_source(cfg, source[0], source[1], "val")
        except EmptySplitError as e:  # a damaged val shard is an error, not "no validation"
            if warn is not None:
                warn(f"no validation{f' for source {name}' if name else ''}: {e}")
    return out


def val_record(losses: dict[str, float | None], train_ds) -> dict[str, float]:
    """The validation metrics: {"val_loss": v} for one source; for a mixture "val_loss/NAME"
    per source and, as val_loss, their mean weighted by the mixture's weights."""
    got = {k: v for k, v in losses.items() if v is not None}
    if not got:
        return {}
    if "" in got:
        return {"val_loss": got[""]}
    weight = dict(zip(train_ds.names, train_ds.weights))
    total = sum(weight[k] for k in got)
    mean = sum(weight[k] * v for k, v in got.items()) / total
    return {"val_loss": mean, **{f"val_loss/{k}": v for k, v in got.items()}}


def source_tokens(train_ds, cursor: int, skipped, global_batch: int) -> dict[str, int]:
    """{"tokens/NAME": tokens of that source trained on before `cursor`}, from the sample ->
    source function alone (no device sync); batches in `skipped` (dropped bad steps) are not
    counted. {} for one source."""
    if not isinstance(train_ds, MixtureDataset):
        return {}
    seen = np.array(train_ds.counts(cursor))
    for c in skipped:
        if c < cursor:
            seen -= np.array(train_ds.counts(c + global_batch)) - train_ds.counts(c)
    return {f"tokens/{n}": int(k) * train_ds.seq_len for n, k in zip(train_ds.names, seen)}
