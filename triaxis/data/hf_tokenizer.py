"""`--tokenizer hf:PATH`: the tokenizer of a Hugging Face model, for fine-tuning imported weights.

PATH is a tokenizer.json or a folder holding one (a model folder as `huggingface-cli download`
writes it), local or s3://. The end-of-document token is `--eos-token`, else the `eos_token` of
tokenizer_config.json (or special_tokens_map.json) beside the tokenizer.json. Only the
`tokenizers` library is needed: no `transformers`.
"""

from __future__ import annotations

import json
import os

from triaxis import storage, storage_client
from triaxis.data.tokenizer import HFTokenizer
from triaxis.errors import UserError

PREFIX = "hf:"
FILE = "tokenizer.json"
_EOS_FILES = ("tokenizer_config.json", "special_tokens_map.json")
"""Where Hugging Face folders record `eos_token`, in the order transformers reads them."""
MODEL_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""Copied with the tokenizer: its special tokens, chat template and generation ids."""
_EXPECTED = "a tokenizer.json or a Hugging Face model folder holding one"


def open_hf_tokenizer(path: str, eos_token: str = "") -> HFTokenizer:
    """The tokenizer at PATH (`hf:PATH` without the prefix); every problem is one UserError."""
    what = f"--tokenizer {PREFIX}{path}"
    if not path:
        raise UserError(
            f"{what}: no path after '{PREFIX}'; give {_EXPECTED}, e.g. "
            f"{PREFIX}~/models/Llama-3.2-1B"
        )
    file = _tokenizer_file(path, what)
    try:
        raw = storage.read_bytes(file)
    except FileNotFoundError:
        raise UserError(f"{what}: {file} does not exist; give {_EXPECTED}") from None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(raw.decode())
    except Exception as e:  # noqa: BLE001  (the Rust side raises a bare Exception)
        raise UserError(
            f"{what}: {file} is not a tokenizer.json the `tokenizers` library can "
            f"read ({e}); give the tokenizer.json of a Hugging Face model"
        ) from None
    where = "--eos-token"
    folder = file.rsplit("/", 1)[0] if storage.is_remote(file) else os.path.dirname(file) or "."
    if not eos_token:
        eos_token, where = _configured_eos(folder, what)
    if not eos_token:
        raise UserError(
            f"{what}: no eos_token in a tokenizer_config.json beside {file}; pass "
            "the end-of-document token with --eos-token TEXT, e.g. "
            "--eos-token '<|end_of_text|>'"
        )
    if tok.token_to_id(eos_token) is None:
        special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
        hint = f"one of its special tokens {special[:8]}" if special else "a token it holds"
        raise UserError(
            f"{what}: the end-of-document token {eos_token!r} (from {where}) is not "
            f"in the vocabulary of {file}; pass --eos-token with {hint}"
        )
    return HFTokenizer(tok, eos_token, path, _model_files(folder))


def _model_files(folder: str) -> dict[str, bytes]:
    """The model's own tokenizer files beside its tokenizer.json, carried with the data."""
    out = {}
    for name in MODEL_FILES:
        file = storage.join(folder, name)
        if storage.exists(file):
            out[name] = storage.read_bytes(file)
    return out


def tokenizer_folder(path: str) -> str:
    """The folder holding the tokenizer.json of hf:PATH (`path` without the prefix): where its
    tokenizer_config.json and chat template live."""
    file = _tokenizer_file(path, f"--tokenizer {PREFIX}{path}")
    return file.rsplit("/", 1)[0] if storage.is_remote(file) else os.path.dirname(file)


def _tokenizer_file(path: str, what: str) -> str:
    """PATH itself if it names a file, else PATH/tokenizer.json."""
    if storage.is_remote(path):
        # Listing a prefix to tell a file from a folder costs a request; names decide.
        storage_client.check_location(path, "--tokenizer")
        return path if path.endswith(".json") else storage.join(path, FILE)
    local = os.path.expanduser(path)
    if os.path.isfile(local):
        return local
    if os.path.isdir(local):
        return os.path.join(local, FILE)
    raise UserError(f"{what}: {path} does not exist; give {_EXPECTED}")


def _configured_eos(folder: str, what: str) -> tuple[str, str]:
    """(eos_token, the file it came from), or ("", "") when the folder names none."""
    for name in _EOS_FILES:
        file = storage.join(folder, name)
        if not storage.exists(file):
            continue
        try:
            config = json.loads(storage.read_bytes(file))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(
                f"{what}: {file} is not valid JSON ({e}); fix or remove it, or pass "
                "--eos-token TEXT"
            ) from None
        eos = config.get("eos_token") if isinstance(config, dict) else None
        if isinstance(eos, dict):  # an AddedToken written out: {"content": ..., ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos, file
    return "", ""
