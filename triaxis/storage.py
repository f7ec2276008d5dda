"""The one storage seam: local (or shared, FSx-for-Lustre style) paths on plain `os`, `s3://`
through fsspec/s3fs. Every file triaxis reads or writes goes through these functions.

How a remote store is reached (the cached S3 clients and their settings, the retries, the
error messages, the early `check_location`) is `storage_client.py`; this module holds the file
operations built on it, each taking a local path or a URI alike.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

from triaxis.errors import UserError
from triaxis.storage_client import filesystem, is_remote, with_retries


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base).joinpath(*parts))


def check_output_path(path: str, what: str, folder: bool = False) -> None:
    """Before a command prints or computes anything: a local output file (or, with `folder`,
    a folder made on demand) can be written at `path`. A remote folder is left to the
    command's own check_location; a remote file is refused (these files are written locally)."""
    if is_remote(path):
        if not folder:
            raise UserError(f"{what} {path}: this file is written locally; give a local path")
        return
    p = Path(path)
    if not folder and (p.is_dir() or not p.name or str(path).endswith(os.sep)):
        raise UserError(f"{what} {path} is a folder; give a file name, e.g. {p / 'out'}")
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{what} {path} is a file; give a folder")
    # The folder the first write goes into: the nearest one that exists for a made-on-demand
    # folder, the parent for a file (which must exist: files are written, folders not made).
    parent = p.absolute().parent if not folder else p.absolute()
    while folder and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists() or not parent.is_dir():
        why = "does not exist" if not parent.exists() else "is not a folder"
        raise UserError(f"{what} {path}: {parent} {why}; create the folder or write elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"{what} {path}: the folder {parent} is not writable (permission denied); "
            "choose another path"
        )


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            if start is not None:
                f.seek(start)
                return f.read((end or os.path.getsize(path)) - start)
            return f.read()
    fs, p = filesystem(path)
    return with_retries(lambda: fs.cat_file(p, start=start, end=end), f"reading {path}")


def write_bytes(path: str, data: bytes) -> None:
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers never see a half-written file
        return
    fs, p = filesystem(path)
    with_retries(lambda: fs.pipe_file(p, data), f"writing {path}")


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = filesystem(path)
    return with_retries(lambda: fs.exists(p), f"checking {path}")


def listdir(path: str) -> list[str]:
    """Names directly under `path` (empty if it does not exist)."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, p = filesystem(path)

    def ls() -> list[str]:
        try:
            return sorted(x.rstrip("/").rsplit("/", 1)[-1] for x in fs.ls(p, refresh=True))
        except FileNotFoundError:
            return []

    return with_retries(ls, f"listing {path}")


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = filesystem(path)
    return with_retries(lambda: fs.size(p), f"reading the size of {path}")


def remove(path: str) -> None:
    """Remove a file or a folder tree; missing is fine."""
    if not is_remote(path):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
        return
    fs, p = filesystem(path)

    def rm() -> None:
        try:
            fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass

    with_retries(rm, f"removing {path}")


def remove_all(paths: list[str]) -> None:
    """Remove these files (remote: in batched requests, so all on one filesystem); missing
    ones are fine."""
    if not paths:
        return
    if not is_remote(paths[0]):
        for p in paths:
            remove(p)
        return
    fs, _ = filesystem(paths[0])
    stripped = [filesystem(p)[1] for p in paths]

    def rm() -> None:
        try:
            fs.rm(stripped)
        except FileNotFoundError:
            pass

    with_retries(rm, f"removing {len(paths)} objects under {paths[0]}")


def copy(src: str, dst: str) -> None:
    """Copy one file (remote: server-side, both on one filesystem)."""
    if not is_remote(src):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return
    fs, s = filesystem(src)
    d = filesystem(dst)[1]
    with_retries(lambda: fs.copy(s, d), f"copying {src} to {dst}")


def upload(local: str, dst: str) -> None:
    """Put the local file `local` at `dst` (remote: streamed, in parts; local: a copy)."""
    if not is_remote(dst):
        copy(local, dst)
        return
    fs, d = filesystem(dst)
    with_retries(lambda: fs.put_file(local, d), f"uploading {local} to {dst}")


def move(src: str, dst: str) -> None:
    """Rename a file or folder tree (remote: each object copied server-side, then the
    originals removed; both on one filesystem)."""
    if not is_remote(src):
        os.rename(src, dst)
        return
    fs, s = filesystem(src)
    d = filesystem(dst)[1]

    def mv() -> None:
        # Not fs.mv(recursive=True): s3fs then also copies the folder "keys" it lists, which
        # do not exist as objects, and fails. A retry after a partial move finds what is left.
        fs.invalidate_cache(s)
        files = fs.find(s)
        for f in files:
            fs.copy(f, d + f[len(s) :])
        if files:
            fs.rm(files)
        fs.invalidate_cache(d)

    with_retries(mv, f"moving {src} to {dst}")


def list_files(spec: str, extensions: tuple[str, ...]) -> list[str]:
    """The remote files `spec` names, sorted, as full URIs: a glob's matching files, the
    object itself, or every object under the prefix with one of `extensions`."""
    fs, p = filesystem(spec)
    scheme = spec.split("://", 1)[0]
    if any(c in p for c in "*?["):
        found = with_retries(lambda: fs.glob(p, detail=True), f"listing {spec}")
        found = [f for f, info in found.items() if info.get("type") == "file"]
    elif with_retries(lambda: fs.isfile(p), f"checking {spec}"):
        found = [p]
    else:
        found = with_retries(lambda: fs.find(p), f"listing {spec}")
        found = [f for f in found if os.path.splitext(f)[1] in extensions]
    return [f"{scheme}://{f}" for f in sorted(found)]


class RangedReader(io.RawIOBase):
    """A seekable read-only file over ranged reads of a remote object (each one retried)."""

    def __init__(self, uri: str):
        self.uri, self.pos = uri, 0
        self.size = size(uri)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        data = read_bytes(self.uri, self.pos, self.pos + n)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_read(path: str, buffer_bytes: int = 0):
    """A binary file to stream `path` from: local, or remote through ranged reads of
    `buffer_bytes` each (0: unbuffered, for readers that seek to known offsets, like Parquet)."""
    if not is_remote(path):
        return open(path, "rb")
    raw = RangedReader(path)
    return io.BufferedReader(raw, buffer_size=buffer_bytes) if buffer_bytes else raw
