"""Local shards checked against their manifest before a run reads them.

- Always (free): the manifest's structure, and each shard's size against its token count.
- `data.verify = "sha256"` (the default): each shard's sha256 and its largest token id, read
  once. The result is remembered in a small marker file keyed by the shard's identity (path,
  size, inode, mtime and ctime: any write changes the ctime), so later runs and the other ranks
  of the same run skip the work until the file changes. Markers live under
  $TRIAXIS_CACHE_DIR (default ~/.cache/triaxis)/verified; deleting them only costs a re-hash.
- `data.verify = "size"`: sizes only (for data on a trusted, very slow file system).

Every mismatch is one UserError line naming the shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from triaxis.errors import UserError

VERIFY_MODES = ("sha256", "size")
_READ_BYTES = 16 * 2**20


def check_manifest(manifest: object, where: str) -> None:
    """The fields a reader relies on, with their types: a damaged manifest is one line."""

    def bad(what: str) -> UserError:
        return UserError(f"{where} is damaged ({what}); prepare the data again")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    try:
        np.dtype(manifest["dtype"])
    except (KeyError, TypeError):
        raise bad("no valid dtype") from None
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise bad(f"dtype {manifest['dtype']!r} is not uint16 or uint32")
    tok = manifest.get("tokenizer")
    if (
        not isinstance(tok, dict)
        or not isinstance(tok.get("vocab_size"), int)
        or tok["vocab_size"] < 1
        or not isinstance(tok.get("kind"), str)
    ):
        raise bad("no tokenizer with a vocab_size")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise bad("no splits")
    for name, split in splits.items():
        if (
            not isinstance(split, dict)
            or not isinstance(split.get("shards"), list)
            or not isinstance(split.get("tokens"), int)
        ):
            raise bad(f"split {name!r} has no shard list")
        for s in split["shards"]:
            if (
                not isinstance(s, dict)
                or not isinstance(s.get("file"), str)
                or not isinstance(s.get("tokens"), int)
                or s["tokens"] < 0
                or not isinstance(s.get("sha256"), str)
            ):
                raise bad(f"a shard entry of split {name!r} lacks file, tokens or sha256")
            if os.path.basename(s["file"]) != s["file"] or s["file"] in ("", ".", ".."):
                raise bad(f"shard name {s['file']!r} is not a plain file name")
            if "loss_mask" in manifest:
                mask = s.get("mask_file")
                if not isinstance(mask, str) or not isinstance(s.get("mask_sha256"), str):
                    raise bad(f"a shard of split {name!r} lacks its loss mask_file / mask_sha256")
                if os.path.basename(mask) != mask or mask in ("", ".", ".."):
                    raise bad(f"mask name {mask!r} is not a plain file name")
        if sum(s["tokens"] for s in split["shards"]) != split["tokens"]:
            raise bad(f"split {name!r}: the shards' tokens do not add up to its total")


def check_shard_size(path: Path, tokens: int, itemsize: int) -> None:
    if not path.is_file():
        raise UserError(f"shard {path} listed in the manifest is missing; prepare again")
    size = path.stat().st_size
    if size != tokens * itemsize:
        raise UserError(
            f"shard {path} has {size} bytes but the manifest says {tokens} tokens "
            f"x {itemsize} bytes = {tokens * itemsize}: the file is truncated or "
            "replaced; prepare the data again"
        )


def verify_mask(path: Path, sha256: str) -> None:
    """A loss-mask file: its sha256, and bytes that are 0 or 1 only (same remembered check)."""
    verify_shard(path, sha256, np.dtype(np.uint8), 2, "loss-mask value")


def verify_shard(
    path: Path, sha256: str, dtype: np.dtype, vocab_size: int, what: str = "token id"
) -> None:
    """sha256 and largest token id of one local shard, or a remembered earlier result."""
    st = path.stat()
    ident = [str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    # One marker per shard path, replaced when the file changes: markers never pile up per run.
    marker = _marker_dir() / (hashlib.sha1(ident[0].encode()).hexdigest() + ".json")
    seen = _read_marker(marker)
    if seen is not None and seen.get("ident") == ident and seen.get("sha256") == sha256:
        max_token = int(seen["max_token"])
    else:
        digest, max_token = _hash_and_max(path, dtype)
        if digest != sha256:
            raise UserError(
                f"shard {path} fails its sha256 check: the file is corrupted or "
                "changed since `triaxis prepare` wrote it; prepare the data again"
            )
        _write_marker(marker, {"ident": ident, "sha256": sha256, "max_token": max_token})
    if max_token >= vocab_size:
        raise UserError(
            f"shard {path} holds {what} {max_token}, outside the data's "
            f"{'vocabulary' if what == 'token id' else 'range'} of {vocab_size}; the shard "
            "does not belong to this "
            "manifest: prepare the data again"
        )


def _hash_and_max(path: Path, dtype: np.dtype) -> tuple[str, int]:
    h, max_token = hashlib.sha256(), -1
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BYTES), b""):
            h.update(block)
            ids = np.frombuffer(block[: len(block) // dtype.itemsize * dtype.itemsize], dtype)
            if ids.size:
                max_token = max(max_token, int(ids.max()))
    return h.hexdigest(), max_token


def _marker_dir() -> Path:
    root = os.environ.get("TRIAXIS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "triaxis"
    )
    return Path(root, "verified")


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, record: dict) -> None:
    """Best effort: without a writable cache the shard is simply hashed again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        pass
