"""`triaxis prepare`: text -> token shards + manifest.json, locally or on s3://.

Output layout (one folder or s3:// prefix):
    manifest.json        token counts, per-shard sha256, tokenizer, split, sources (written last)
    tokenizer.json       the trained BPE, or a copy of the hf:PATH one (byte needs no file)
    train_00000.bin ...  flat token ids, numpy uint16 (vocab <= 65536) or uint32
    val_00000.bin ...
    train_00000.mask ... with --format chat / prompt-completion: one uint8 per token, 1 where the
                         token is a target the loss counts (assistant / completion), 0 else
Documents are separated by the tokenizer's end-of-document token.

Inputs are streamed one file at a time (`sources.py`): a first pass trains the BPE (not for
byte or hf:PATH), a second tokenizes. Tokenization runs in a pool of worker processes fed with
chunks of documents in order and read back in order, so the shards are byte-identical for any
number of workers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from triaxis import storage, storage_client
from triaxis.data.chat import FORMATS, ChatTemplate, encode_example, iter_examples
from triaxis.data.format import FORMAT, MASK_DTYPE, MASK_SUFFIX
from triaxis.data.hf_tokenizer import PREFIX as HF_PREFIX
from triaxis.data.hf_tokenizer import open_hf_tokenizer, tokenizer_folder
from triaxis.data.output import StagedOutput
from triaxis.data.packing import check_overlong, encode_each, packing_report, split_packers
from triaxis.data.sources import (
    EXTENSIONS,
    InputCount,
    embedded_corpus_files,
    iter_documents,
    resolve_inputs,
)
from triaxis.data.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_from_state
from triaxis.errors import UserError
from triaxis.fields import RANGE, check_value, ranged

SPLITS = ("train", "val")
_CHUNK_DOCS = 256
_CHUNK_CHARS = 1_000_000
"""A chunk of work for one tokenizer worker: at most this many documents / characters."""
BPE_SAMPLE_CHARS = 12_000_000
"""The BPE tokenizer trains on the first documents up to this many characters: a sample is
enough for its merges, and training time grows with it. Every document is still tokenized."""
EMBEDDED_CHARS = 12_000_000
"""Without --input, the demo corpus (the Python stdlib) is read up to this many characters."""
PIECE_CHARS = 1 << 18
"""Longer documents are cut into pieces of about this many characters for BPE training and for
bpe/byte tokenization: `tokenizers` needs ~200 bytes of memory per character of one input
string, so one 41 MB line once took 8 GB. Cuts fall on a single space between two non-space
characters, where the byte-level pre-tokenizer splits anyway, so the token ids are the same as
for the whole document (only a run of PIECE_CHARS characters without such a space is cut
hard)."""


@dataclass
class PrepareOptions:
    inputs: list[str]
    """Files, folders, globs or s3:// URIs; empty = the embedded corpus (the Python stdlib)."""
    output: str
    """Output folder or s3:// prefix."""
    tokenizer: str = "bpe"
    """bpe (trained on the corpus), byte, or hf:PATH (a Hugging Face tokenizer.json or a model
    folder holding one, local or s3://)."""
    vocab_size: int = ranged(8192, ge=300, le=2**31)
    """BPE vocabulary size (bpe only: byte and hf:PATH bring their own vocabulary)."""
    eos_token: str = ""
    """End-of-document token for hf:PATH (default: eos_token of its tokenizer_config.json)."""
    max_bytes: int = ranged(0, ge=0)
    """Tokenize only the first documents up to this many characters (0 = all input; prepare
    says how much a limit left unread). The BPE tokenizer trains on at most BPE_SAMPLE_CHARS."""
    val_fraction: float = ranged(0.02, ge=0, le=0.5)
    """Share of documents held out for validation (every round(1/f)-th document)."""
    shard_tokens: int = ranged(16 * 2**20, ge=1, le=2**40)
    """Tokens per shard file."""
    extensions: tuple[str, ...] = EXTENSIONS
    workers: int = ranged(0, ge=0, le=1024)
    """Tokenizer worker processes (0 = min(cpu_count, 8)); the output does not depend on it."""
    format: str = "text"
    """text (documents), chat ({"messages": [...]} lines rendered by the hf:PATH chat template)
    or prompt-completion ({"prompt", "completion"} lines): the last two write a loss mask."""
    pack_seq_len: int = ranged(0, ge=0, le=2**24)
    """Pack whole examples (documents, for text) into windows of this data.seq_len, padded with
    masked tokens, never split across windows (packing.py); 0 = the concatenated stream."""
    overlong: str = "truncate"
    """With --pack-seq-len: an example longer than a window is truncated, dropped, or an
    error (truncate|drop|error); prepare counts and reports them."""


def default_workers() -> int:
    return min(os.cpu_count() or 1, 8)


def prepare(opts: PrepareOptions, log=print) -> dict:
    t0 = time.perf_counter()
    hf = opts.tokenizer.startswith(HF_PREFIX)
    if opts.tokenizer not in ("bpe", "byte") and not hf:
        raise UserError(
            f"--tokenizer {opts.tokenizer!r} is unknown; use bpe, byte or hf:PATH "
            "(a Hugging Face tokenizer.json or model folder)"
        )
    if opts.eos_token and not hf:
        raise UserError(
            f"--eos-token {opts.eos_token!r} applies to --tokenizer hf:PATH only; "
            f"{opts.tokenizer} has its own end-of-document token: drop --eos-token"
        )
    check_options(opts)
    if opts.format not in FORMATS:
        raise UserError(f"--format {opts.format!r} is unknown; use one of {', '.join(FORMATS)}")
    if opts.format != "text" and not hf:
        raise UserError(
            f"--format {opts.format} needs --tokenizer hf:PATH (the model's tokenizer and "
            f"chat template), not {opts.tokenizer}; pass the Hugging Face model folder"
        )
    check_overlong(opts.overlong)
    out = str(opts.output)
    storage_client.check_location(out, "--output")
    staged = StagedOutput(out, log)  # reads only: refuses an output it must not touch
    files = resolve_inputs(opts.inputs, opts.extensions) if opts.inputs else embedded_corpus_files()
    source = "embedded: python stdlib" if not opts.inputs else ", ".join(opts.inputs)

    template = None

    # Counted for the user's input only: the demo corpus is sampled on purpose.
    count = InputCount() if opts.inputs else None
    # The embedded corpus is a demo, not the user's input: a sample of it is enough.
    limit = opts.max_bytes or (0 if opts.inputs else EMBEDDED_CHARS)

    def documents(sample: int = 0, count: InputCount | None = None) -> Iterator:
        cap = min(x for x in (sample, limit) if x) if sample or limit else 0
        if opts.format != "text":
            return iter_examples(files, opts.format, template, cap, count)
        return iter_documents(files, cap, count)

    if opts.tokenizer == "byte":
        tok = ByteTokenizer()
    elif hf:
        tok = open_hf_tokenizer(opts.tokenizer[len(HF_PREFIX) :], opts.eos_token)
        log(
            f"tokenizer {tok.source}: vocab {tok.vocab_size}, each document followed by "
            f"{tok.eos_token!r} (id {tok.eos_id})"
        )
        if opts.format != "text":
            folder = tokenizer_folder(opts.tokenizer[len(HF_PREFIX) :])
            template = ChatTemplate.load(folder, opts.tokenizer, opts.format == "chat")
    else:
        seen = _Counter(documents(BPE_SAMPLE_CHARS))
        tok = BPETokenizer.train((p for doc in seen for p in split_long(doc)), opts.vocab_size)
        if not seen.docs:
            raise UserError(f"inputs {opts.inputs or [source]} hold no text; give non-empty files")
        log(
            f"trained BPE tokenizer, vocab {tok.vocab_size}, on {seen.docs} documents, "
            f"{seen.chars / 1e6:.1f} MB from {source} (at most {BPE_SAMPLE_CHARS:,} characters)"
        )

    # Nothing is written before this point; from here on, into a staging folder that is swapped
    # in only if everything works (output.py).
    try:
        manifest, docs, processes = _write(
            opts, tok, lambda: documents(count=count), staged, source
        )
        staged.commit(json.dumps(manifest, indent=1).encode())
    except BaseException:
        staged.abort()
        raise
    for line in count.report(limit) if count else []:
        log(line)
    train = manifest["splits"]["train"]
    if "target_tokens" in train:
        log(
            f"loss mask: {train['target_tokens']:,} of {train['tokens']:,} train tokens are "
            f"targets ({opts.format}: assistant / completion tokens and their end)"
        )
    for line in packing_report(manifest):
        log(line)
    log(
        f"wrote {manifest['splits']['train']['tokens']:,} train and "
        f"{manifest['splits']['val']['tokens']:,} val tokens ({docs} documents) to {out} "
        f"({processes or 'no'} worker processes) in {time.perf_counter() - t0:.1f}s"
    )
    return manifest


def check_options(opts: PrepareOptions) -> None:
    """Every option against the range in its definition, named as on the command line."""
    import dataclasses

    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            check_value("--" + f.name.replace("_", "-"), item, f.metadata.get(RANGE))


def _write(
    opts: PrepareOptions, tok, documents, staged: StagedOutput, source: str
) -> tuple[dict, int, int]:
    """Tokenize into staged shards; (manifest, documents, worker processes)."""
    put, out = staged.put, staged.stage
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    masked = opts.format != "text" or opts.pack_seq_len > 0  # packing pads with masked tokens
    writers = [_ShardWriter(out, split, dtype, opts.shard_tokens, put, masked) for split in SPLITS]
    packers = split_packers(writers, opts.pack_seq_len, tok.eos_id, dtype, opts.overlong)
    every = round(1 / opts.val_fraction) if opts.val_fraction > 0 else 0
    workers = opts.workers or default_workers()
    # hf:PATH tokenizers may treat the start of an input specially (a prefix space, a BOS):
    # their documents stay whole.
    piece_chars = 0 if tok.kind == "hf" else PIECE_CHARS
    chunks = _chunks(_assign_splits(documents(), every), writers, piece_chars)
    processes = [0]  # set by encode_in_order: the worker processes it started
    fn = encode_each if opts.pack_seq_len else _encode_examples if masked else _encode_chunk
    for arrays in encode_in_order(chunks, workers, tok, processes, fn):
        for writer, packer, arr in zip(writers, packers, arrays):
            if opts.pack_seq_len:
                packer.add_all(arr)
            else:
                writer.add(*arr) if masked else writer.add(arr)
    packed = [p.packer.close() for p in packers] if opts.pack_seq_len else None
    if not any(w.documents for w in writers):
        raise UserError(f"inputs {opts.inputs or [source]} hold no text; give non-empty files")

    manifest = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "source": source,
        "tokenizer": tok.save(out, put),
        "splits": {},
    }
    if masked:
        manifest["input_format"] = opts.format
        manifest["loss_mask"] = {"dtype": np.dtype(MASK_DTYPE).name, "suffix": MASK_SUFFIX}
    if packed:
        manifest["packing"] = {"seq_len": opts.pack_seq_len, "overlong": opts.overlong}
    for i, (split, writer) in enumerate(zip(SPLITS, writers)):
        manifest["splits"][split] = writer.close()
        if packed:
            manifest["splits"][split]["packing"] = packed[i]
    return manifest, sum(w.documents for w in writers), processes[0]


class _Counter:
    """Passes documents through, counting them (for the log of the BPE pass)."""

    def __init__(self, docs: Iterable[str]):
        self.it, self.docs, self.chars = iter(docs), 0, 0

    def __iter__(self) -> Iterator[str]:
        for doc in self.it:
            self.docs += 1
            self.chars += len(doc)
            yield doc


def _assign_splits(docs: Iterable[str], every: int) -> Iterator[tuple[int, str]]:
    """(split index, document): every `every`-th document to val. A corpus smaller than
    `every` documents (but more than one) gives its last document to val. One document of
    look-ahead is all that rule needs, so the corpus is never counted first."""
    held, n, any_val = None, 0, False
    for doc in docs:
        if held is not None:
            yield held
        split = 1 if every and n % every == every - 1 else 0
        any_val |= split == 1
        held, n = (split, doc), n + 1
    if held is not None:
        if every and not any_val and n > 1:
            held = (1, held[1])
        yield held


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


def _chunks(
    docs: Iterable[tuple[int, str]], writers: list[_ShardWriter], piece_chars: int = 0
) -> Iterator[list[tuple[int, str, bool]]]:
    """Chunks of (split, text, ends a document); with piece_chars, long documents in pieces."""
    chunk: list[tuple[int, str, bool]] = []
    chars = 0
    for split, doc in docs:
        writers[split].documents += 1
        pieces = list(split_long(doc, piece_chars)) if piece_chars else [doc]
        for i, piece in enumerate(pieces):
            chunk.append((split, piece, i == len(pieces) - 1))
            chars += len(piece)
            if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
                yield chunk
                chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_chunk(tok, chunk: list[tuple[int, str, bool]]) -> list[np.ndarray]:
    """One array per split: the chunk's texts of that split, EOS after each document's end."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    eos = np.array([tok.eos_id], dtype=dtype)
    encoded = tok.encode_arrays([text for _, text, _ in chunk], dtype)
    parts: list[list[np.ndarray]] = [[] for _ in SPLITS]
    for (split, _, ends), ids in zip(chunk, encoded):
        parts[split] += [ids, eos] if ends else [ids]
    return [np.concatenate(p) if p else np.zeros(0, dtype) for p in parts]


def _encode_examples(tok, chunk: list) -> list[tuple[np.ndarray, np.ndarray]]:
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
    chunks: Iterable[list], workers: int, tok, processes: list[int], fn=_encode_chunk
) -> Iterator[list]:
    """_encode_chunk of each chunk, in input order. With workers > 1 (and more than one chunk)
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


class _ShardWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` (the last shorter)."""

    def __init__(
        self,
        out: str,
        split: str,
        dtype,
        shard_tokens: int,
        put=storage.write_bytes,
        masked: bool = False,
    ):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.put = put
        self.shards: list[dict] = []
        self.buf: list[np.ndarray] = []
        self.mask_buf: list[np.ndarray] | None = [] if masked else None  # cut with the tokens
        self.buffered = self.tokens = self.documents = self.targets = 0

    def add(self, arr: np.ndarray, mask: np.ndarray | None = None) -> None:
        if arr.size == 0:
            return
        self.buf.append(arr)
        if self.mask_buf is not None:
            assert mask is not None and mask.size == arr.size, "a mask byte per token"
            self.mask_buf.append(mask)
        self.buffered += arr.size
        while self.buffered >= self.shard_tokens:
            flat, n = np.concatenate(self.buf), self.shard_tokens
            masks = np.concatenate(self.mask_buf) if self.mask_buf is not None else None
            self._flush(flat[:n], None if masks is None else masks[:n])
            self.buf, self.buffered = [flat[n:]], flat.size - n
            if masks is not None:
                self.mask_buf = [masks[n:]]

    def _flush(self, arr: np.ndarray, mask: np.ndarray | None) -> None:
        stem = f"{self.split}_{len(self.shards):05d}"
        data = arr.astype(self.dtype).tobytes()
        self.put(storage.join(self.out, stem + ".bin"), data)
        shard = {
            "file": stem + ".bin",
            "tokens": int(arr.size),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        if mask is not None:
            raw = mask.astype(MASK_DTYPE).tobytes()
            self.put(storage.join(self.out, stem + MASK_SUFFIX), raw)
            shard["mask_file"] = stem + MASK_SUFFIX
            shard["mask_sha256"] = hashlib.sha256(raw).hexdigest()
            self.targets += int(np.count_nonzero(mask))
        self.shards.append(shard)
        self.tokens += int(arr.size)

    def close(self) -> dict:
        if self.buffered:
            masks = self.mask_buf
            self._flush(np.concatenate(self.buf), None if masks is None else np.concatenate(masks))
            self.mask_buf = None if masks is None else []
            self.buf, self.buffered = [], 0
        out = {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}
        if self.mask_buf is not None:
            out["target_tokens"] = self.targets  # tokens the loss counts (mask 1)
        return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
