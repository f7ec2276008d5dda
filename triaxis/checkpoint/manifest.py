"""Checkpoint manifests: what makes a checkpoint visible, valid, and kept.

A checkpoint folder `step_XXXXXXXX/` (on a filesystem or under an s3:// prefix) holds DCP's files,
one `__r.sha256.json` per rank (the sha256 and size of the files that rank wrote), and, written
last, `triaxis.json`: the manifest (step, data cursor, model shape, layout, resolved config, and
every file with its size and checksum). Only a folder with a manifest is a checkpoint; a crash
at any moment before it leaves nothing that looks complete. Works the same on S3, which has no
atomic rename: a single object PUT is atomic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from triaxis import storage

META = "triaxis.json"
PREFIX = "step_"


def step_dir(root: str, step: int) -> str:
    return storage.join(root, f"{PREFIX}{step:08d}")


def sidecar_name(rank: int) -> str:
    return f"__{rank}.sha256.json"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    h.update(storage.read_bytes(path))
    return h.hexdigest()


def write_sidecar(folder: str, rank: int) -> None:
    """Checksum the files this rank wrote (DCP names them __{rank}_*.distcp)."""
    mine = [n for n in storage.listdir(folder) if n.startswith(f"__{rank}_")]
    entries = {n: {"size": storage.size(storage.join(folder, n)),
                   "sha256": sha256_of(storage.join(folder, n))} for n in mine}
    storage.write_bytes(storage.join(folder, sidecar_name(rank)), json.dumps(entries).encode())


def ready_to_commit(folder: str, world_size: int) -> bool:
    names = set(storage.listdir(folder))
    return ".metadata" in names and all(sidecar_name(r) in names for r in range(world_size))


def commit(folder: str, world_size: int, meta: dict) -> None:
    """Rank 0, after every rank's sidecar landed: write the manifest, making it visible."""
    files = {".metadata": {"size": storage.size(storage.join(folder, ".metadata")),
                           "sha256": sha256_of(storage.join(folder, ".metadata"))}}
    for r in range(world_size):
        files.update(json.loads(storage.read_bytes(storage.join(folder, sidecar_name(r)))))
    storage.write_bytes(storage.join(folder, META),
                        json.dumps({**meta, "files": files}, indent=1).encode())


@dataclass
class Found:
    path: str
    step: int


def list_checkpoints(root: str) -> list[Found]:
    """Committed checkpoints under `root` (those with a manifest), oldest first."""
    found = []
    for name in storage.listdir(root):
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
            path = storage.join(root, name)
            if storage.exists(storage.join(path, META)):
                found.append(Found(path, int(name[len(PREFIX):])))
    return sorted(found, key=lambda f: f.step)


def uncommitted(root: str) -> list[str]:
    """Step folders without a manifest: interrupted saves."""
    return [storage.join(root, n) for n in storage.listdir(root)
            if n.startswith(PREFIX) and not storage.exists(storage.join(root, n, META))]


def read_meta(path: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(path, META)))


def verify(path: str, only: list[str] | None = None) -> list[str]:
    """Problems with a checkpoint (missing files, wrong sizes or checksums); [] when valid.
    `only` restricts the check to some files (ranks share the work)."""
    meta = read_meta(path)
    problems = []
    for name, want in meta["files"].items():
        if only is not None and name not in only:
            continue
        f = storage.join(path, name)
        if not storage.exists(f):
            problems.append(f"{name} is missing")
        elif storage.size(f) != want["size"]:
            problems.append(f"{name} has {storage.size(f)} bytes, the manifest says {want['size']}")
        elif sha256_of(f) != want["sha256"]:
            problems.append(f"{name} fails its sha256 check")
    return problems


def to_delete(found: list[Found], keep_last: int, keep_every: int) -> list[Found]:
    """Retention: keep the last `keep_last` (0 = all) plus every step divisible by keep_every."""
    if keep_last <= 0:
        return []
    recent = {f.step for f in found[-keep_last:]}
    return [f for f in found
            if f.step not in recent and not (keep_every and f.step % keep_every == 0)]
