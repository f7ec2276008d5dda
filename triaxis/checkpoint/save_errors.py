"""How a failed checkpoint write is judged, the same way on every rank: transient (the ranks
retry it together), or permanent (a user error, a full disk, a bug), with the one line each
rank reports. Also the test hook that skews the ranks' timing."""

from __future__ import annotations

import os

from triaxis import storage_client
from triaxis.checkpoint import dcp_io, integrity
from triaxis.errors import UserError


class FailedElsewhere(Exception):
    """This rank's part of a save went well; another rank's did not."""


def rank_delays(rank: int) -> dict[str, float]:
    """TRIAXIS_TEST_CKPT_DELAY="RANK:WHERE:SECONDS,...": rank skew for tests (WHERE = write,
    sidecar or poll). Read once, when the checkpointer is built."""
    out: dict[str, float] = {}
    for item in filter(None, os.environ.get("TRIAXIS_TEST_CKPT_DELAY", "").split(",")):
        r, where, seconds = item.split(":")
        if int(r) == rank:
            out[where] = float(seconds)
    return out


def is_transient(err: BaseException) -> bool:
    """Storage trouble worth retrying (network, throttling, a service hiccup), as opposed to a
    full disk, missing credentials or a bug."""
    if dcp_io.disk_full_in(err) is not None:
        return False
    for e in integrity.walk(err):
        if isinstance(e, storage_client.StorageUnavailable):
            return True
        if isinstance(e, UserError) or isinstance(e, PermissionError):
            return False
        try:
            permanent = storage_client.classify(e, "")
        except Exception:  # noqa: BLE001  (an exception shaped unlike botocore's)
            permanent = None
        if isinstance(permanent, UserError):
            return False  # credentials, access denied, missing bucket
    for e in integrity.walk(err):
        mod = type(e).__module__.split(".")[0]
        if isinstance(e, (OSError, TimeoutError, ConnectionError)) or mod in (
            "botocore",
            "aiobotocore",
            "urllib3",
            "aiohttp",
            "s3fs",
        ):
            return True
    return False


def short(err: BaseException | None) -> str:
    """The innermost error, on one line."""
    inner = [e for e in integrity.walk(err)] if err is not None else []
    e = inner[-1] if inner else err
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def outcome(err: BaseException | None) -> tuple[bool, str] | None:
    """(permanent, one line) for a failed save; None when this rank has nothing to say."""
    if err is None or isinstance(err, FailedElsewhere):
        return None
    user = integrity.find_in(err, UserError)
    if user is not None and not isinstance(user, storage_client.StorageUnavailable):
        return True, str(user)
    full = dcp_io.disk_full_in(err)
    if full is not None:
        return True, str(dcp_io.disk_full(full, "this save"))
    if is_transient(err):
        return False, short(err)
    return True, f"bug: {short(err)}"
