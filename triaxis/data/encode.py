"""Tokenizing a corpus in parallel and in order: documents cut into pieces and chunks, chunks
encoded by a pool of spawned worker processes, the results read back in input order, so the
shards `prepare` writes are byte-identical for any number of workers.

Apart from `prepare.py` (the options, the tokenizer choice, the train/val split, the shards and
the manifest) because this is the part that runs in worker processes: a spawned worker imports
this module and the tokenizer's, not the writer with its storage and output staging.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from triaxis.data.chat import encode_example
from triaxis.data.format import MASK_DTYPE, SPLITS
from triaxis.data.tokenizer import tokenizer_from_state

CHUNK_DOCS = 256
CHUNK_CHARS = 1_000_000
"""A chunk of work for one tokenizer worker: at most this many documents / characters."""
PIECE_CHARS = 1 << 18
"""Longer documents are cut into pieces of about this many characters for BPE training and for
bpe/byte tokenization: `tokenizers` needs ~200 bytes of memory per character of one input
string, so one 41 MB line once took 8 GB. Cuts fall on a single space between two non-space
characters, where the byte-level pre-tokenizer splits anyway, so the token ids are the same as
for the whole document (only a run of PIECE_CHARS characters without such a space is cut
hard)."""


def default_workers() -> int:
    return min(os.cpu_count() or 1, 8)


def split_long(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `piece_chars` characters, each cut (when one
    exists in the second half of the window) just before a single space that sits between two
    non-space characters: a place where the byte-level pre-tokenizer splits anyway."""
    start, n = 0, len(text)
    while n - start > piece_chars:
        end = start + piece_chars
        cut = text.rfind(" ", start + piece_chars // 2, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + piece_chars // 2, cut)
        if cut <= start:
            cut = end  # no clean place: a hard cut
        yield text[start:cut]
        start = cut
    yield text[start:]


def chunks(
    docs: Iterable[tuple[int, str]], writers: list, piece_chars: int = 0
) -> Iterator[list[tuple[int, str, bool]]]:
    """Chunks of (split, text, ends a document); with piece_chars, long documents in pieces.
    Each document is counted in its split's writer (`writers[split].documents`) as it passes."""
    chunk: list[tuple[int, str, bool]] = []
    chars = 0
    for split, doc in docs:
        writers[split].documents += 1
        pieces = list(split_long(doc, piece_chars)) if piece_chars else [doc]
        for i, piece in enumerate(pieces):
            chunk.append((split, piece, i == len(pieces) - 1))
            chars += len(piece)
            if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
                yield chunk
                chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_chunk(tok, chunk: list[tuple[int, str, bool]]) -> list[np.ndarray]:
    """One array per split: the chunk's texts of that split, EOS after each document's end."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    eos = np.array([tok.eos_id], dtype=dtype)
    encoded = tok.encode_arrays([text for _, text, _ in chunk], dtype)
    parts: list[list[np.ndarray]] = [[] for _ in SPLITS]
    for (split, _, ends), ids in zip(chunk, encoded):
        parts[split] += [ids, eos] if ends else [ids]
    return [np.concatenate(p) if p else np.zeros(0, dtype) for p in parts]


def encode_examples(tok, chunk: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss mask) per split: the chunk's chat / prompt-completion examples."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    parts: list[list] = [[] for _ in SPLITS]
    for split, example, _ in chunk:
        parts[split].append(encode_example(tok, example, dtype))
    return [
        (np.concatenate([i for i, _ in p]), np.concatenate([m for _, m in p]))
        if p
        else (np.zeros(0, dtype), np.zeros(0, MASK_DTYPE))
        for p in parts
    ]


_worker_tok = None


def _init_worker(state: dict) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker_tok = tokenizer_from_state(state)


def _encode_in_worker(fn, chunk: list) -> list:
    return fn(_worker_tok, chunk)


def encode_in_order(
    chunks: Iterable[list], workers: int, tok, processes: list[int], fn=encode_chunk
) -> Iterator[list]:
    """`fn` (encode_chunk) of each chunk, in input order. With workers > 1 (and more than one chunk)
    a pool of spawned processes encodes them, at most 2 x workers chunks in flight: memory
    stays bounded however long the input is, and the order of the results never changes."""
    it = iter(chunks)
    head = [c for c in (next(it, None), next(it, None)) if c is not None]
    if len(head) < 2 or workers <= 1:
        for chunk in itertools.chain(head, it):
            yield fn(tok, chunk)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may already run tokenizer (rayon) or torch threads.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tok.state(),),
    )
    processes[0] = workers
    pending: deque = deque()
    try:
        for chunk in itertools.chain(head, it):
            pending.append(pool.submit(_encode_in_worker, fn, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
