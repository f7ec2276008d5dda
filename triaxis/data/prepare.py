"""`triaxis prepare`: text files -> token shards + manifest.json.

Output layout (one folder):
    manifest.json        token counts, per-shard sha256, tokenizer, split, sources
    tokenizer.json       the trained BPE (byte-level tokenizers need no file)
    train_00000.bin ...  flat token ids, numpy uint16 (vocab <= 65536) or uint32
    val_00000.bin ...
Documents are separated by the tokenizer's end-of-document token.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from triaxis.data.tokenizer import BPETokenizer, ByteTokenizer
from triaxis.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "triaxis-tokens-v1"


@dataclass
class PrepareOptions:
    inputs: list[str]
    """Files, folders or globs; empty = the embedded corpus (the Python standard library)."""
    output: str
    tokenizer: str = "bpe"
    """bpe (trained on the corpus) or byte."""
    vocab_size: int = 8192
    max_bytes: int = 12_000_000
    """Stop reading input after this many bytes (0 = no limit)."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (every round(1/f)-th document)."""
    shard_tokens: int = 16 * 2**20
    """Tokens per shard file."""
    extensions: tuple[str, ...] = (".py", ".txt", ".md", ".rst")


def embedded_corpus_files() -> list[Path]:
    """The running interpreter's standard-library sources: a corpus that needs no download."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts)]
    return sorted(files)


def resolve_inputs(inputs: list[str], extensions: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in extensions)
            if not found:
                raise UserError(f"input folder {spec} holds no {'/'.join(extensions)} files; "
                                "point --input at text files or a glob like 'docs/**/*.txt'")
            files.extend(found)
        else:
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
            if not found:
                raise UserError(f"input {spec!r} matches no file or folder; check the path "
                                "(globs need quotes: --input 'data/*.txt')")
            files.extend(found)
    return files


def read_documents(files: list[Path], max_bytes: int) -> list[str]:
    docs, total = [], 0
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            continue
        docs.append(text)
        total += len(text)
        if max_bytes and total >= max_bytes:
            break
    return docs


def prepare(opts: PrepareOptions, log=print) -> dict:
    t0 = time.perf_counter()
    files = resolve_inputs(opts.inputs, opts.extensions) if opts.inputs else embedded_corpus_files()
    source = "embedded: python stdlib" if not opts.inputs else ", ".join(opts.inputs)
    docs = read_documents(files, opts.max_bytes)
    if not docs:
        raise UserError(f"inputs {opts.inputs or [source]} hold no text; give non-empty files")
    n_bytes = sum(len(d) for d in docs)
    log(f"read {len(docs)} documents, {n_bytes / 1e6:.1f} MB from {source}")

    if opts.tokenizer == "byte":
        tok = ByteTokenizer()
    elif opts.tokenizer == "bpe":
        if opts.vocab_size < 300:
            raise UserError(f"--vocab-size {opts.vocab_size} is too small for BPE; use >= 300")
        tok = BPETokenizer.train(iter(docs), opts.vocab_size)
        log(f"trained BPE tokenizer, vocab {tok.vocab_size}")
    else:
        raise UserError(f"--tokenizer {opts.tokenizer!r} is unknown; use bpe or byte")

    out = Path(opts.output)
    if (out / MANIFEST).exists():
        log(f"replacing the prepared data in {out}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.bin"):
        old.unlink()
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    every = round(1 / opts.val_fraction) if opts.val_fraction > 0 else 0
    if every > len(docs) > 1:
        every = len(docs)  # a small corpus still gets one validation document
    splits = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        splits["val" if every and i % every == every - 1 else "train"].append(doc)

    manifest = {"format": FORMAT, "dtype": np.dtype(dtype).name, "source": source,
                "tokenizer": tok.save(out), "splits": {}}
    for split, split_docs in splits.items():
        manifest["splits"][split] = _write_split(out, split, split_docs, tok, dtype,
                                                 opts.shard_tokens)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    ntrain = manifest["splits"]["train"]["tokens"]
    log(f"wrote {ntrain:,} train and {manifest['splits']['val']['tokens']:,} val tokens "
        f"to {out} in {time.perf_counter() - t0:.1f}s")
    return manifest


def _write_split(out: Path, split: str, docs: list[str], tok, dtype, shard_tokens: int) -> dict:
    shards: list[dict] = []
    buf: list[np.ndarray] = []
    buffered = 0

    def flush(arr: np.ndarray) -> None:
        name = f"{split}_{len(shards):05d}.bin"
        data = arr.astype(dtype).tobytes()
        (out / name).write_bytes(data)
        shards.append({"file": name, "tokens": int(arr.size),
                       "sha256": hashlib.sha256(data).hexdigest()})

    total = 0
    for start in range(0, len(docs), 256):
        for ids in tok.encode_batch(docs[start:start + 256]):
            buf.append(np.asarray(ids + [tok.eos_id], dtype=np.int64))
            buffered += len(ids) + 1
        while buffered >= shard_tokens:
            flat = np.concatenate(buf)
            flush(flat[:shard_tokens])
            total += shard_tokens
            buf, buffered = [flat[shard_tokens:]], flat.size - shard_tokens
    if buffered:
        flush(np.concatenate(buf))
        total += buffered
    return {"tokens": total, "documents": len(docs), "shards": shards}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
