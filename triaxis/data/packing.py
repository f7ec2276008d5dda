"""Whole-example packing (`prepare --pack-seq-len N`): examples into windows, never split.

Without packing, window w of a split is tokens [w·seq_len, w·seq_len + seq_len + 1) of the
concatenated stream, so an example crossing a window edge is cut: its answer trains without its
prompt. With packing, `prepare` writes the split as whole windows of exactly N + 1 tokens
(inputs and shifted targets), each holding whole examples and padded with masked
end-of-document tokens, and the reader steps by N + 1 (dataset.py). Packing happens at prepare
time because that keeps the reader what it was: a window is still a fixed slice of the shards,
the sample order is still a pure function of (seed, index), so the one-integer cursor, exact
resume, data-parallel-change invariance and mixtures work unchanged, and the reader needs no
index in memory. The price: the data is packed for one data.seq_len (the reader checks it).

The bin packing is first-fit over a bounded set of open windows (`OPEN_WINDOWS`): an example
goes into the first open window with room; when none has room and the set is full, the fullest
window is closed (written) first. Memory stays bounded on any corpus, the result depends only
on the input order (deterministic; the training order is shuffled by the seeded sample order
anyway), and on mixed lengths it fills well over 90% of the window tokens.

An example longer than a window (N + 1 tokens) is never split: `overlong` truncates it (its
first N + 1 tokens: the prompt and the start of the answer stay together), drops it, or stops
prepare with one line (nothing is written: prepare stages its output).

The padding token is the end-of-document token with a loss mask of 0: under
data.document_mask each padding token is a document of its own, and the loss never sees it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from triaxis.data.format import MASK_DTYPE
from triaxis.errors import UserError

OVERLONG = ("truncate", "drop", "error")
"""What `prepare --overlong` does with an example longer than a packed window."""
OPEN_WINDOWS = 64
"""Windows kept open for first-fit: more fill better, each costs one window of memory."""


class Packer:
    """Packs one split's examples (token ids, loss mask) into windows of `window` tokens and
    hands each finished window to `emit(tokens, mask)`."""

    def __init__(
        self,
        window: int,
        pad_id: int,
        dtype,
        emit: Callable[[np.ndarray, np.ndarray], None],
        overlong: str = "truncate",
        where: str = "",
    ):
        assert overlong in OVERLONG, overlong
        self.window, self.pad_id, self.dtype, self.emit = window, pad_id, dtype, emit
        self.overlong, self.where = overlong, where
        self.open: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self.fill: list[int] = []
        self.examples = self.truncated = self.dropped = 0
        self.windows = self.real_tokens = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        n = int(ids.size)
        if n == 0:
            return
        if n > self.window:
            if self.overlong == "error":
                raise UserError(
                    f"{self.where}an example of {n} tokens is longer than a packed window of "
                    f"{self.window} (--pack-seq-len {self.window - 1} + 1); pass --overlong "
                    "truncate or drop, or a larger --pack-seq-len"
                )
            if self.overlong == "drop":
                self.dropped += 1
                return
            self.truncated += 1
            ids, mask, n = ids[: self.window], mask[: self.window], self.window
        self.examples += 1
        for b, used in enumerate(self.fill):
            if used + n <= self.window:
                self.open[b].append((ids, mask))
                self.fill[b] += n
                return
        if len(self.open) >= OPEN_WINDOWS:
            self._close(int(np.argmax(self.fill)))
        self.open.append([(ids, mask)])
        self.fill.append(n)

    def _close(self, b: int) -> None:
        parts, used = self.open.pop(b), self.fill.pop(b)
        pad = self.window - used
        tokens = np.concatenate([i for i, _ in parts] + [np.full(pad, self.pad_id, self.dtype)])
        mask = np.concatenate([m for _, m in parts] + [np.zeros(pad, MASK_DTYPE)])
        self.windows += 1
        self.real_tokens += used
        self.emit(tokens.astype(self.dtype, copy=False), mask.astype(MASK_DTYPE, copy=False))

    def close(self) -> dict:
        """Write the open windows (in the order they were opened); the packing's summary."""
        while self.open:
            self._close(0)
        total = self.windows * self.window
        return {
            "windows": self.windows,
            "examples": self.examples,
            "real_tokens": self.real_tokens,
            "efficiency": self.real_tokens / total if total else 0.0,
            "truncated": self.truncated,
            "dropped": self.dropped,
        }


def check_overlong(overlong: str) -> None:
    if overlong not in OVERLONG:
        raise UserError(f"--overlong {overlong!r} is unknown; use one of {', '.join(OVERLONG)}")


def split_packers(writers: list, seq_len: int, pad_id: int, dtype, overlong: str) -> list:
    """One packer per split, writing windows of seq_len + 1 tokens into its shard writer."""
    return [
        PieceJoiner(Packer(seq_len + 1, pad_id, dtype, w.add, overlong, f"{w.split}: "))
        for w in writers
    ]


def packing_report(manifest: dict) -> list[str]:
    """prepare's lines about a packed split: its efficiency and its overlong examples."""
    lines, pack = [], manifest.get("packing")
    for split, info in manifest["splits"].items():
        p = info.get("packing")
        if pack and p and p["windows"]:
            lines.append(
                f"packed {split}: {p['examples']:,} whole examples into {p['windows']:,} windows "
                f"of {pack['seq_len']} + 1 tokens, efficiency {p['efficiency']:.1%} (real tokens "
                f"/ window tokens); overlong ({pack['overlong']}): {p['truncated']} truncated, "
                f"{p['dropped']} dropped"
            )
    return lines


def encode_each(tok, chunk: list) -> list[list[tuple[np.ndarray, np.ndarray, bool]]]:
    """Per split, (token ids, loss mask, ends an example) of each item of a prepare chunk, for
    the packer: a chat / prompt-completion example whole, a text piece with its end-of-document
    token when it ends the document and a mask of ones (plain text trains on every token)."""
    from triaxis.data.chat import encode_example

    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out: list[list] = [[], []]
    texts = [(i, item) for i, item in enumerate(chunk) if isinstance(item[1], str)]
    encoded = dict(
        zip([i for i, _ in texts], tok.encode_arrays([t for _, (_, t, _) in texts], dtype))
    )
    for i, (split, item, ends) in enumerate(chunk):
        if i in encoded:
            ids = encoded[i]
            if ends:
                ids = np.append(ids, np.asarray(tok.eos_id, dtype))
            out[split].append((ids, np.ones(ids.size, MASK_DTYPE), ends))
        else:
            ids, mask = encode_example(tok, item, dtype)
            out[split].append((ids, mask, True))
    return out


class PieceJoiner:
    """Joins the pieces of a long text document (prepare cuts them for the tokenizer) before
    they reach the packer, which must see whole documents."""

    def __init__(self, packer: Packer):
        self.packer, self.ids, self.masks = packer, [], []

    def add_all(self, items: list[tuple[np.ndarray, np.ndarray, bool]]) -> None:
        for item in items:
            self.add(*item)

    def add(self, ids: np.ndarray, mask: np.ndarray, ends: bool) -> None:
        self.ids.append(ids)
        self.masks.append(mask)
        if ends:
            self.packer.add(np.concatenate(self.ids), np.concatenate(self.masks))
            self.ids, self.masks = [], []
