"""Tokenizers: byte-level (no training), byte-level BPE trained on the corpus with
`tokenizers`, and a Hugging Face model's own tokenizer.json (`hf_tokenizer.py` finds it).

Each names one end-of-document token that `prepare` puts after every document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from triaxis import storage

EOS = "<|endoftext|>"


class ByteTokenizer:
    kind = "byte"

    def __init__(self) -> None:
        self.eos_id = 256
        self.vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: list[str], dtype) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(dtype) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, folder: str | Path, write=storage.write_bytes) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def state(self) -> dict:
        """What a worker process needs to rebuild this tokenizer (tokenizer_from_state)."""
        return {"kind": self.kind}


class _JSONTokenizer:
    """Encoding and decoding shared by the tokenizers held as a `tokenizers.Tokenizer`."""

    file_name = "tokenizer.json"
    tok: Any

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust side tokenizes the batch on all cores.
        return [e.ids for e in self.tok.encode_batch(texts)]

    def encode_arrays(self, texts: list[str], dtype) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=dtype) for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))


class BPETokenizer(_JSONTokenizer):
    kind = "bpe"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, folder: str | Path, write=storage.write_bytes) -> dict:
        """Write tokenizer.json into a local folder or an s3:// prefix (with `write`)."""
        write(storage.join(str(folder), self.file_name), self.tok.to_str(pretty=True).encode())
        return {
            "kind": self.kind,
            "file": self.file_name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
        }

    def state(self) -> dict:
        return {"kind": self.kind, "json": self.tok.to_str()}


class HFTokenizer(_JSONTokenizer):
    """A Hugging Face model's tokenizer.json (`--tokenizer hf:PATH`), used as the model was
    trained with it: its post-processor adds what the model expects at the start of every
    document (Llama-3: <|begin_of_text|>), and `prepare` appends `eos_token` after it."""

    kind = "hf"

    def __init__(self, tok, eos_token: str, source: str, model_files: dict | None = None) -> None:
        # A tokenizer.json may carry truncation or padding meant for inference at a fixed
        # length; documents must be encoded whole, unpadded.
        tok.no_truncation()
        tok.no_padding()
        self.tok, self.eos_token, self.source = tok, eos_token, source
        # The model's tokenizer_config.json, chat template, generation config ({name: bytes}):
        # kept beside tokenizer.json so checkpoints can carry them (checkpoint/assets.py).
        self.model_files = model_files or {}
        self.eos_id = tok.token_to_id(eos_token)
        assert self.eos_id is not None, f"{eos_token!r} was checked to be in the vocabulary"
        # Every id must index a row of the model's embedding: a vocabulary with gaps in its
        # ids counts fewer tokens than its largest id.
        largest_id = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), largest_id + 1)

    def save(self, folder: str | Path, write=storage.write_bytes) -> dict:
        """Write the tokenizer as used (no truncation, no padding) next to the shards, so the
        data folder alone serves `load_tokenizer` and `triaxis generate`."""
        write(storage.join(str(folder), self.file_name), self.tok.to_str().encode())
        for name, data in sorted(self.model_files.items()):
            write(storage.join(str(folder), name), data)
        return {
            "kind": self.kind,
            "file": self.file_name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
            "source": self.source,
        }

    def state(self) -> dict:
        return {
            "kind": self.kind,
            "json": self.tok.to_str(),
            "eos_token": self.eos_token,
            "source": self.source,
        }


def _from_json(text: str, info: dict):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(text)
    if info["kind"] == "hf":
        return HFTokenizer(tok, info["eos_token"], info.get("source", ""))
    return BPETokenizer(tok)


def tokenizer_from_state(state: dict):
    if state["kind"] == "byte":
        return ByteTokenizer()
    return _from_json(state["json"], state)


def load_tokenizer(folder: str | Path, info: dict):
    """The tokenizer a manifest describes (its `tokenizer` entry), from a folder or s3://."""
    if info["kind"] == "byte":
        return ByteTokenizer()
    return _from_json(storage.read_bytes(storage.join(str(folder), info["file"])).decode(), info)
