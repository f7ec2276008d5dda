"""Checkpoint manifests: what makes a checkpoint visible, valid, and kept.

A checkpoint folder `step_XXXXXXXX/` (on a filesystem or under an s3:// prefix) holds DCP's files
(`.metadata`, `__R_N.distcp`), one `__R.sha256.json` sidecar per rank (size and per-item
checksums of the files that rank wrote, computed while writing: see integrity.py), and, written
last, `triaxis.json`: the manifest (step, data cursor, model shape, layout, resolved config, the
checksum's name, and every file with its size and checksums). Only a folder with a manifest is
a checkpoint; a crash at any moment before it leaves nothing that looks complete. Works the same
on S3, which has no atomic rename: a single object PUT is atomic.

A manifest is data from disk, not trusted: every name in it must be a plain name DCP writes
(no `/`, no `..`), every entry well formed, and every file a regular file of the recorded size,
or the checkpoint is invalid and never opened. Manifests written before per-item checksums
(and by `triaxis import-hf`) carry a whole-file sha256 instead; those are still verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass

from triaxis import storage, storage_client
from triaxis.checkpoint import checksum

META = "triaxis.json"
PREFIX = "step_"
STEP_NAME = re.compile(r"step_(\d{8,})")
DATA_NAME = re.compile(r"__\d{1,7}_\d{1,7}\.distcp")
ASSET_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)
"""The files that make a checkpoint self-contained (assets.py), beside DCP's."""
FILE_NAME = re.compile(
    r"\.metadata|__\d{1,7}_\d{1,7}\.distcp|" + "|".join(re.escape(n) for n in ASSET_NAMES)
)
_CHUNK = 1 << 20


def step_dir(root: str, step: int) -> str:
    return storage.join(root, f"{PREFIX}{step:08d}")


def sidecar_name(rank: int) -> str:
    return f"__{rank}.sha256.json"


def write_sidecar(folder: str, rank: int, digests: dict) -> None:
    """The sizes and checksums this rank computed while writing its files."""
    storage.write_bytes(storage.join(folder, sidecar_name(rank)), json.dumps(digests).encode())


def commit(folder: str, world_size: int, meta: dict) -> None:
    """Rank 0, after every rank's sidecar landed: write the manifest, making it visible."""
    files: dict = {}
    for r in range(world_size):
        files.update(json.loads(storage.read_bytes(storage.join(folder, sidecar_name(r)))))
    problems = _entry_problems(files)
    if problems or ".metadata" not in files:
        raise RuntimeError(f"sidecars of {folder} are inconsistent: {problems or 'no .metadata'}")
    # The sidecars' checksums are the writer's (integrity.py): checksum.WRITE.
    out = {**meta, "checksum": checksum.WRITE, "files": files}
    storage.write_bytes(storage.join(folder, META), json.dumps(out, indent=1).encode())


@dataclass
class Found:
    path: str
    step: int


def list_checkpoints(root: str) -> list[Found]:
    """Committed checkpoints under `root` (those with a manifest), oldest first."""
    found = []
    for name in storage.listdir(root):
        m = STEP_NAME.fullmatch(name)
        if m:
            path = storage.join(root, name)
            if storage.exists(storage.join(path, META)):
                found.append(Found(path, int(m.group(1))))
    return sorted(found, key=lambda f: f.step)


def uncommitted(root: str) -> list[str]:
    """Step folders without a manifest: interrupted saves."""
    return [
        storage.join(root, n)
        for n in storage.listdir(root)
        if STEP_NAME.fullmatch(n) and not storage.exists(storage.join(root, n, META))
    ]


def read_meta(path: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(path, META)))


class InvalidManifest(Exception):
    pass


def _entry_problems(files) -> list[str]:
    if not isinstance(files, dict) or not files:
        return ["its file table is missing or empty"]
    problems = []
    for name, entry in files.items():
        if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
            problems.append(
                f"it names the file {name!r}, which is not a plain name of a DCP "
                "file (.metadata, __R_N.distcp) nor of a carried tokenizer file"
            )
            continue
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and (isinstance(entry.get("sha256"), str) or _items_ok(entry))
        )
        if not ok:
            problems.append(f"its entry for {name} is malformed")
    return problems


def _items_ok(entry: dict) -> bool:
    """Per-item checksums that tile the file exactly."""
    items = entry.get("items")
    if not isinstance(items, list):
        return False
    pos = 0
    for it in items:
        if not (
            isinstance(it, list)
            and len(it) == 3
            and all(isinstance(x, int) for x in it)
            and it[0] == pos
            and it[1] > 0
        ):
            return False
        pos += it[1]
    return pos == entry["size"]


def load_manifest(path: str) -> dict:
    """The manifest of the checkpoint at `path`, checked for shape and safe names; raises
    InvalidManifest with the reason."""
    try:
        meta = read_meta(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidManifest(f"{META} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InvalidManifest(f"{META} is not a JSON object")
    problems = _entry_problems(meta.get("files"))
    if ".metadata" not in (meta.get("files") or {}):
        problems.append("it lists no .metadata")
    if not checksum.known(checksum.of_manifest(meta)):
        problems.append(f"its checksum {meta['checksum']!r} is not one this triaxis knows")
    if problems:
        raise InvalidManifest("; ".join(problems))
    return meta


def _file_problem(path: str, name: str, want: dict) -> str | None:
    """Cheap checks before anything is opened: exists, a regular file, the recorded size."""
    f = storage.join(path, name)
    if storage.is_remote(f):
        if not storage.exists(f):
            return f"{name} is missing"
        got = storage.size(f)
    else:
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            return f"{name} is missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is not a regular file"
        got = st.st_size
    if got != want["size"]:
        return f"{name} has {got} bytes, the manifest says {want['size']}"
    return None


def check(path: str) -> tuple[dict | None, list[str]]:
    """(manifest, problems) without reading any data file: the shape and names of the
    manifest, and each file present, regular and of the recorded size."""
    try:
        meta = load_manifest(path)
    except InvalidManifest as err:
        return None, [str(err)]
    problems = [
        p
        for name, want in sorted(meta["files"].items())
        if (p := _file_problem(path, name, want)) is not None
    ]
    return meta, problems


def is_legacy(meta: dict) -> bool:
    """Whole-file sha256 instead of per-item checksums (older saves, import-hf)."""
    return any("items" not in e for e in meta["files"].values())


def _stream(path: str):
    """A file's bytes in bounded chunks."""
    if not storage.is_remote(path):
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(_CHUNK), b"")
        return
    fs, p = storage_client.filesystem(path)
    with fs.open(p, "rb", block_size=8 * _CHUNK) as f:
        yield from iter(lambda: f.read(8 * _CHUNK), b"")


def _content_problem(path: str, name: str, want: dict, algorithm: str) -> str | None:
    f = storage.join(path, name)
    if "items" not in want:
        h = hashlib.sha256()
        for chunk in _stream(f):
            h.update(chunk)
        return None if h.hexdigest() == want["sha256"] else f"{name} fails its sha256 check"
    items, i, h = want["items"], 0, checksum.new(algorithm)
    left = items[0][1] if items else 0
    for chunk in _stream(f):
        mv = memoryview(chunk)
        while len(mv):
            if i == len(items):
                return f"{name} is longer than its manifest says"
            take = mv[:left]
            h.update(take)
            left, mv = left - len(take), mv[len(take) :]
            if left == 0:
                if h.intdigest() != items[i][2]:
                    return (
                        f"{name} fails its checksum (bytes {items[i][0]}.."
                        f"{items[i][0] + items[i][1]} changed after they were written)"
                    )
                i, h = i + 1, checksum.new(algorithm)
                left = items[i][1] if i < len(items) else 0
    return None if i == len(items) else f"{name} is shorter than its manifest says"


def verify(path: str, only: list[str] | None = None) -> list[str]:
    """Problems with a checkpoint (invalid manifest, missing files, wrong sizes or checksums,
    unsafe metadata); [] when valid. Reads every file once, in bounded chunks. `only` restricts
    the content check to some files (ranks share the work)."""
    meta, problems = check(path)
    if meta is None or problems:
        return problems
    for name, want in sorted(meta["files"].items()):
        if only is not None and name not in only:
            continue
        p = _content_problem(path, name, want, checksum.of_manifest(meta))
        if p is None and name == ".metadata":
            p = metadata_problem(path)
        if p is not None:
            problems.append(p)
    return problems


def metadata_problem(path: str) -> str | None:
    """Whether `.metadata` is DCP metadata that names only files of this checkpoint."""
    from triaxis.checkpoint.safe_load import UnsafeMetadata, load_metadata

    try:
        md = load_metadata(storage.read_bytes(storage.join(path, ".metadata")), ".metadata")
    except UnsafeMetadata as err:
        return str(err)
    names = set(read_meta(path)["files"])
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if rel not in names or not DATA_NAME.fullmatch(str(rel)):
            return f".metadata points at {rel!r}, which is not a data file of this checkpoint"
    return None


def to_delete(found: list[Found], keep_last: int, keep_every: int) -> list[Found]:
    """Retention: keep the last `keep_last` (0 = all) plus every step divisible by keep_every."""
    if keep_last <= 0:
        return []
    recent = {f.step for f in found[-keep_last:]}
    return [
        f for f in found if f.step not in recent and not (keep_every and f.step % keep_every == 0)
    ]
