"""Tokenizers: byte-level (no training), and byte-level BPE trained on the corpus with `tokenizers`.

Both reserve one end-of-document token that `prepare` puts between documents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

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


class BPETokenizer:
    kind = "bpe"
    file_name = "tokenizer.json"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.eos_id = tok.token_to_id(EOS)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust side tokenizes the batch on all cores.
        return [e.ids for e in self.tok.encode_batch(texts)]

    def encode_arrays(self, texts: list[str], dtype) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=dtype) for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def save(self, folder: str | Path, write=storage.write_bytes) -> dict:
        """Write tokenizer.json into a local folder or an s3:// prefix (with `write`)."""
        write(storage.join(str(folder), self.file_name), self.tok.to_str(pretty=True).encode())
        return {"kind": self.kind, "file": self.file_name, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id}

    def state(self) -> dict:
        return {"kind": self.kind, "json": self.tok.to_str()}


def tokenizer_from_state(state: dict):
    if state["kind"] == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_str(state["json"]))


def load_tokenizer(folder: str | Path, info: dict):
    """The tokenizer a manifest describes (its `tokenizer` entry), from a folder or s3://."""
    if info["kind"] == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    path = storage.join(str(folder), info["file"])
    if storage.is_remote(path):
        return BPETokenizer(Tokenizer.from_str(storage.read_bytes(path).decode()))
    return BPETokenizer(Tokenizer.from_file(path))
