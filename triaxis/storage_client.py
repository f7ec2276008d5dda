"""The client half of the storage seam: how a remote store is reached, and what its errors mean.

Every S3 client is built here: the per-process clients, the settings they are built from
(`s3_options`, also handed to DCP's own fsspec writer and reader), the retries of transient
errors, the classification of the rest into one-line errors with the fix, and the one early check
of a location (`check_location`) with its messages. Kept apart from `storage.py`, the file
operations every caller uses: those need only `filesystem` and `with_retries`, while what changes
with the service (credentials, endpoints, error codes, the retry policy) changes here alone.

S3 settings come from the standard AWS chain (environment, profile, instance role); an
S3-compatible store is reached with `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from triaxis.errors import UserError

T = TypeVar("T")


def is_remote(path: str | os.PathLike) -> bool:
    """A URI (s3://, memory://, hf://...) rather than a local path; `storage.is_remote` too."""
    return "://" in str(path)


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
