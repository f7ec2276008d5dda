"""What makes a checkpoint self-contained: the tokenizer as training used it, its special tokens
and chat template, and a generation config (bos/eos ids), as Hugging Face names the files. Every
checkpoint carries them (written by rank 0 beside DCP's files, listed in the manifest with their
checksums like every other file), so `generate`, `export-hf` and `checkpoint.initial` need no
data folder and retention never separates a checkpoint from its tokenizer.

The manifest's "tokenizer" entry is the data manifest's (kind, file, eos_id, ...): a byte
tokenizer needs no file. Checkpoints written before carry neither: their readers fall back to the
recorded data folder (inference.tokenizer_folder).
"""

from __future__ import annotations

import json

from triaxis import storage
from triaxis.checkpoint import checksum
from triaxis.checkpoint import manifest as mf
from triaxis.data.tokenizer import EOS, tokenizer_from_state
from triaxis.errors import UserError

TOKENIZER, TOKENIZER_CONFIG, TEMPLATE, GENERATION = mf.ASSET_NAMES[:4]
_FROM_MODEL = (TOKENIZER_CONFIG, TEMPLATE, GENERATION, "special_tokens_map.json")
"""A Hugging Face model's own files, copied when its folder is at hand."""


def carried_files(cfg, info: dict, model_args) -> dict[str, bytes]:
    """The files a run's checkpoints carry (`cfg`: the run's Config)."""
    return gather(cfg.data.tokenizer_path(), info, model_args.max_seq_len)


def gather(data_path: str, info: dict, max_seq_len: int) -> dict[str, bytes]:
    """{file name: bytes} for a run whose data is at `data_path` with tokenizer `info`."""
    kind = info.get("kind")
    if kind not in ("byte", "bpe", "hf"):
        return {}  # synthetic data: no tokenizer to carry
    out: dict[str, bytes] = {}
    if kind != "byte":
        out[TOKENIZER] = storage.read_bytes(storage.join(data_path, info["file"]))
    # The model's own files: copied into the data folder by prepare (hf:PATH), else (data
    # prepared before that) from the recorded source folder when it is still there.
    for folder in [data_path] + ([info["source"]] if info.get("source") else []):
        for name in _FROM_MODEL:
            if name not in out and _is_file(storage.join(folder, name)):
                out[name] = storage.read_bytes(storage.join(folder, name))
    if kind != "byte" and TOKENIZER_CONFIG not in out:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": info.get("eos_token", EOS),
            "model_max_length": max_seq_len,
            "clean_up_tokenization_spaces": False,
        }
        out[TOKENIZER_CONFIG] = json.dumps(config, indent=1).encode()
    if GENERATION not in out:
        gen = {"eos_token_id": info["eos_id"], **_bos(out, info)}
        out[GENERATION] = json.dumps(gen, indent=1).encode()
    return out


def _is_file(path: str) -> bool:
    try:
        return storage.exists(path)
    except (OSError, ValueError):  # a source folder that is no longer reachable
        return False


def _bos(files: dict[str, bytes], info: dict) -> dict:
    """{"bos_token_id": id} when the tokenizer config names a bos token the vocabulary holds."""
    try:
        bos = json.loads(files.get(TOKENIZER_CONFIG, b"{}")).get("bos_token")
    except (ValueError, AttributeError):
        return {}
    if isinstance(bos, dict):
        bos = bos.get("content")
    if not isinstance(bos, str) or TOKENIZER not in files:
        return {}
    tok = tokenizer_from_state({**info, "json": files[TOKENIZER].decode()})
    found = tok.tok.token_to_id(bos)
    return {} if found is None else {"bos_token_id": found}


def write(folder: str, assets: dict[str, bytes], algorithm: str = checksum.WRITE) -> dict:
    """Write the files into a checkpoint folder; their manifest entries (size, checksum)."""
    entries = {}
    for name, data in sorted(assets.items()):
        storage.write_bytes(storage.join(folder, name), data)
        items = [[0, len(data), checksum.digest(algorithm, data)]] if data else []
        entries[name] = {"size": len(data), "items": items}
    return entries


def carried(meta: dict) -> bool:
    """Whether a checkpoint carries its tokenizer (one written since checkpoints do)."""
    info = meta.get("tokenizer")
    if not isinstance(info, dict) or info.get("kind") not in ("byte", "bpe", "hf"):
        return False
    return info["kind"] == "byte" or info.get("file") in meta["files"]


def read(ckpt: str, meta: dict, name: str) -> bytes:
    """One carried file, checked against its manifest entry."""
    data = storage.read_bytes(storage.join(ckpt, name))
    want = meta["files"][name]
    algorithm = checksum.of_manifest(meta)
    good = len(data) == want["size"] and all(
        checksum.digest(algorithm, data[a : a + n]) == d for a, n, d in want.get("items", [])
    )
    if not good:
        raise UserError(
            f"checkpoint {ckpt}: {name} fails its checksum; restore it, or pass "
            "--data PATH (the prepared folder with the run's tokenizer)"
        )
    return data


def tokenizer(ckpt: str, meta: dict):
    """The tokenizer a checkpoint carries (`carried(meta)` must hold)."""
    info = meta["tokenizer"]
    if info["kind"] == "byte":
        return tokenizer_from_state(info)
    return tokenizer_from_state({**info, "json": read(ckpt, meta, info["file"]).decode()})


def hf_files(ckpt: str, meta: dict) -> dict[str, bytes]:
    """The carried files a Hugging Face folder holds (all but none for a byte tokenizer)."""
    return {n: read(ckpt, meta, n) for n in mf.ASSET_NAMES if n in meta["files"]}
