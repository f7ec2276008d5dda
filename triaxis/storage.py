"""The one storage seam: local (or shared, FSx-for-Lustre style) paths on plain `os`, `s3://`
through fsspec/s3fs, with retries of transient errors and clear errors for the rest.

Every S3 access goes through here: the per-process clients, the settings they are built from
(`s3_options`, also handed to DCP's own fsspec writer and reader), the retries, and the one
early check of a location (`check_location`) with its messages.

S3 settings come from the standard AWS chain (environment, profile, instance role); an
S3-compatible store is reached with `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from triaxis.errors import UserError

T = TypeVar("T")


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base).joinpath(*parts))


_S3_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)
"""The settings an S3 client is built from: a change of any of them gets a new client."""
_s3_clients: dict[tuple, object] = {}
_s3_lock = threading.Lock()


def s3_options() -> dict:
    """The fsspec/s3fs keyword settings for S3 from this environment (the endpoint of an
    S3-compatible store); credentials and region come from the AWS chain inside botocore.
    Anything that builds its own S3 filesystem (DCP's fsspec writer and reader) takes these."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def s3_filesystem():
    """This process's S3 filesystem for the current AWS settings. Building one (a botocore
    session, credential chain, connection pool) costs ~0.3 s, a request on a warm one ~15 ms
    (bench/storage_calls.py), so it is built once per process and settings, not per call; the
    process id is part of the key because a client does not survive fork."""
    key = (os.getpid(), *(os.environ.get(k) for k in _S3_ENV))
    with _s3_lock:
        fs = _s3_clients.get(key)
        if fs is None:
            import s3fs

            # Our own retry loop (below) sees every error; s3fs's default retries stay as they
            # are. skip_instance_cache: fsspec's own cache keys ignore the environment. No
            # listings cache: other processes write the objects this one polls (manifests).
            fs = _s3_clients[key] = s3fs.S3FileSystem(
                **s3_options(), skip_instance_cache=True, use_listings_cache=False
            )
        return fs


def filesystem(path: str | os.PathLike):
    """(fsspec filesystem, path as that filesystem spells it)."""
    path = str(path)
    if path.startswith("s3://"):
        return s3_filesystem(), path[len("s3://") :]
    if is_remote(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs, p
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), path


_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
}


_BAD_CREDENTIALS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "Access Key Id you provided does not exist",
    "signature we calculated does not match",
    "security token included in the request is invalid",
    "token included in the request is expired",
)
"""What S3 answers when a key is wrong (s3fs passes on the message, not the code)."""


def classify(err: BaseException, what: str) -> BaseException | None:
    """A UserError for permanent problems (missing bucket, no credentials), None if transient."""
    name = type(err).__name__
    text = str(err)
    if (
        name in ("NoCredentialsError", "PartialCredentialsError")
        or "Unable to locate credentials" in text
    ):
        return UserError(
            f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role"
        )
    if any(k in text for k in _BAD_CREDENTIALS):
        return UserError(
            f"{what}: the AWS credentials were refused ({text[:120]}); check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile or role) "
            "for this endpoint"
        )
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return UserError(
            f"{what}: the bucket does not exist; create it (aws s3 mb) or fix the s3:// URI"
        )
    if name in ("PermissionError",) or "AccessDenied" in text:
        return UserError(
            f"{what}: access denied; grant the role s3:GetObject/PutObject/"
            "ListBucket on that bucket"
        )
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return err
    if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
        return UserError(f"{what}: the disk is full; free space or point the path elsewhere")
    # botocore errors carry a response dict; some (an HTTP client error) carry None.
    response = getattr(err, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    if code and code not in _TRANSIENT_CODES:
        return err
    return None


class StorageUnavailable(UserError):
    """Transient errors that outlasted the retries: the service may come back."""


def with_retries(fn: Callable[[], T], what: str, attempts: int = 6, base_delay_s: float = 0.2) -> T:
    """Run `fn`, retrying transient storage errors with exponential backoff and jitter."""
    for attempt in range(attempts):
        try:
            return fn()
        except UserError:
            raise
        except Exception as err:  # storage libraries raise many types; classify them
            permanent = classify(err, what)
            if permanent is not None:
                if permanent is err:
                    raise
                raise permanent from None
            if attempt == attempts - 1:
                raise StorageUnavailable(
                    f"{what}: still failing after {attempts} attempts "
                    f"({err}); check the storage service and the "
                    "network"
                ) from None
            time.sleep(base_delay_s * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


_BUCKET_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
"""Object stores whose first path component is a bucket (or container) that can be probed;
other remote schemes (http, hf, memory) have none and are left to the first real access."""


def check_location(path: str, what: str) -> None:
    """Fail early, with the fix, when a remote location cannot be reached (missing bucket,
    no credentials, refused credentials, access denied); local folders are created on demand.
    `what` names the setting in the message (`checkpoint.dir`, `--output`)."""
    if not is_remote(path) or str(path).split("://", 1)[0] not in _BUCKET_SCHEMES:
        return
    if str(path).startswith("s3://"):
        import botocore.session

        # Without credentials s3fs silently falls back to anonymous access, and every private
        # bucket then looks missing: name the real problem instead.
        if botocore.session.get_session().get_credentials() is None:
            raise UserError(
                f"{what} {path}: no AWS credentials found; set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance "
                "role"
            )
    fs, p = filesystem(path)
    bucket = p.split("/", 1)[0]

    def probe() -> None:
        if not fs.exists(bucket):
            try:  # exists() says False for a refused key too: ask in a way that says why
                fs.ls(bucket, refresh=True)
            except Exception as err:  # noqa: BLE001  (classified; else the bucket is missing)
                refused = classify(err, f"{what} {path}")
                if isinstance(refused, UserError) and "the bucket does not exist" not in str(
                    refused
                ):
                    raise refused from None
            raise UserError(
                f"{what} {path}: the bucket {bucket} does not exist; create it "
                f"(aws s3 mb s3://{bucket}) or fix the URI"
            )
        fs.ls(p, refresh=True) if fs.exists(p) else None

    with_retries(probe, f"{what} {path}")


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
