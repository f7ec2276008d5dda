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
chunks of documents in order and read back in order (`encode.py`), so the shards are
byte-identical for any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from triaxis import storage, storage_client
from triaxis.data.chat import FORMATS, ChatTemplate, iter_examples
from triaxis.data.encode import (
    PIECE_CHARS,
    chunks,
    default_workers,
    encode_chunk,
    encode_examples,
    encode_in_order,
    split_long,
)
from triaxis.data.format import FORMAT, MASK_DTYPE, MASK_SUFFIX, SPLITS
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
from triaxis.data.tokenizer import BPETokenizer, ByteTokenizer
from triaxis.errors import UserError
from triaxis.fields import RANGE, check_value, ranged

BPE_SAMPLE_CHARS = 12_000_000
"""The BPE tokenizer trains on the first documents up to this many characters: a sample is
enough for its merges, and training time grows with it. Every document is still tokenized."""
EMBEDDED_CHARS = 12_000_000
"""Without --input, the demo corpus (the Python stdlib) is read up to this many characters."""


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
    work = chunks(_assign_splits(documents(), every), writers, piece_chars)
    processes = [0]  # set by encode_in_order: the worker processes it started
    fn = encode_each if opts.pack_seq_len else encode_examples if masked else encode_chunk
    for arrays in encode_in_order(work, workers, tok, processes, fn):
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
