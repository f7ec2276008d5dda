"""One live run per folder: a lease file with its owner and a heartbeat.

Two runs writing one checkpoint folder (or run folder) interleave metrics.jsonl and delete each
other's checkpoints. The first run writes `.triaxis-lease.json` (host, pid, start time, a
heartbeat refreshed by a background thread); a second run reads it and stops with one line
naming the holder. A lease whose holder is gone is taken over:

    same host, holder pid dead (or reused by another process)  -> at once
    any host, no heartbeat for `expires_s`                     -> after that long

What it can and cannot prevent (docs/resilience.md has the long form):
- Local and shared POSIX file systems: creation is atomic (a complete file hard-linked into
  place), and taking over a stale lease renames it away first (atomic: one of two racing runs
  wins).
- S3: creation is a conditional PUT (`If-None-Match: *`), a takeover and each heartbeat a PUT
  with `If-Match: <ETag>` of the lease read: of two racing runs one gets 412 Precondition
  Failed. AWS S3 honours both since 2024 (and moto does); an S3-compatible store that ignores
  them degrades to last-writer-wins, where two runs starting within one request's time can
  both believe they hold the lease.
- Expiry trusts the hosts' clocks (the heartbeat is wall-clock time): keep them NTP-synced;
  a skew near `expires_s` lets a live run's lease look stale.
- A run paused (SIGSTOP, a frozen VM) for longer than `expires_s` loses its lease; its
  heartbeat thread notices and says so, but it is not stopped.

A run writes several folders (run folder, checkpoint folder): `plan_leases` covers each once.
A folder nested in another the run writes is covered by the outer one's lease; it is only
checked (with every folder above the leased ones) for another run's live lease, so a run whose
checkpoint folder lies inside a live run's run folder is refused too. That look is not atomic:
two runs starting within milliseconds into folders nested in each other can both start.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from triaxis import storage, storage_client
from triaxis.errors import UserError

LEASE_NAME = ".triaxis-lease.json"
HEARTBEAT_S = 15.0
"""How often the holder refreshes its lease."""
EXPIRES_S = 120.0
"""A lease not refreshed for this long belongs to a dead run (8 missed heartbeats)."""


@dataclass
class Lease:
    host: str
    pid: int
    pid_start: str
    """The pid's start time (/proc/PID/stat field 22): tells a reused pid from the holder."""
    started: float
    heartbeat: float
    expires_s: float
    token: str
    job: str
    """torchelastic's run id: an elastic restart of the same job takes its own lease over."""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, pid {self.pid}, since {since}"


def _pid_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def holder_is_dead(lease: Lease, now: float) -> str | None:
    """Why the lease's holder is gone, or None if it may be alive."""
    if now - lease.heartbeat > lease.expires_s:
        return f"no heartbeat for {now - lease.heartbeat:.0f} s"
    if lease.host == socket.gethostname():
        start = _pid_start(lease.pid)
        if not start:
            return f"pid {lease.pid} is not running"
        if lease.pid_start and start != lease.pid_start:
            return f"pid {lease.pid} is now another process"
    return None


class RunLock:
    """The lease on one folder (local path or s3:// prefix), held by this process."""

    def __init__(self, folder: str, heartbeat_s: float = HEARTBEAT_S, expires_s: float = EXPIRES_S):
        self.folder = str(folder).rstrip("/")
        self.path = storage.join(self.folder, LEASE_NAME)
        self.heartbeat_s, self.expires_s = heartbeat_s, expires_s
        self.remote = storage.is_remote(self.folder)
        self.lease: Lease | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        """Set by the heartbeat thread when another run took the lease over."""

    # -- the store: create if absent, read, replace if unchanged -------------------------------
    def _create(self, data: bytes) -> bool:
        if self.remote:
            return self._put_if(data, {"mode": "create"})
        os.makedirs(self.folder, exist_ok=True)
        # Write a whole file, then link it into place (atomic, fails if the name exists): a
        # reader never sees a half-written lease, which it would take for a stale one.
        tmp = f"{self.path}.new-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE mounts): an exclusive create
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            os.remove(tmp)

    def _read(self) -> tuple[Lease | None, str | None]:
        """(lease, etag); (None, None) if there is none. An unreadable lease counts as stale."""
        etag = None
        try:
            if self.remote:
                fs, p = storage_client.filesystem(self.path)
                # ETag first: if the lease changes before it is read, a PUT If-Match fails.
                etag = storage_client.with_retries(
                    lambda: fs.info(p, refresh=True).get("ETag"), f"reading {self.path}"
                )
                raw = storage.read_bytes(self.path)
            else:
                with open(self.path, "rb") as f:
                    raw = f.read()
        except FileNotFoundError:
            return None, None
        try:
            return Lease(**json.loads(raw)), etag
        except (ValueError, TypeError):
            return Lease("?", 0, "", 0.0, 0.0, 0.0, "", ""), etag  # torn or foreign: stale

    def _replace(self, data: bytes, expect_etag: str | None, expect_token: str | None) -> bool:
        """Write the lease if it is still the one read (etag on S3, token locally)."""
        if self.remote:
            return self._put_if(data, {"IfMatch": expect_etag})
        current, _ = self._read()
        if current is None or current.token != expect_token:
            return False
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
        return True

    def _put_if(self, data: bytes, condition: dict) -> bool:
        """A conditional PUT; False when S3 answers 412 Precondition Failed (another run
        created or changed the lease first). Other errors are retried as usual."""
        fs, p = storage_client.filesystem(self.path)

        def put():
            try:
                return fs.pipe_file(p, data, **condition)
            except Exception as e:  # s3fs maps 412 to FileExistsError or OSError(EINVAL)
                if isinstance(e, FileExistsError) or _precondition_failed(e):
                    return None
                if _error_code(e) != "NotImplemented":
                    raise
            # A store without conditional writes: last writer wins (see the module docstring).
            if not _warned_unconditional:
                _warned_unconditional.append(True)
                print(
                    f"warning: {self.folder}: this S3 store does not support conditional "
                    "writes; the run lease cannot stop two runs that start together",
                    file=sys.stderr,
                    flush=True,
                )
            if condition.get("mode") == "create" and fs.exists(p):
                return None  # check-then-write: the race the condition would have closed
            return fs.pipe_file(p, data)

        out = storage_client.with_retries(put, f"writing the run lease {self.path}")
        if out is None:
            return False
        self._etag = _etag_of(out)
        return True

    def _take_over_local(self, stale: Lease, data: bytes) -> bool:
        # Rename the stale lease away (atomic: of two racing runs only one succeeds), then
        # create ours exclusively.
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create(data)
        moved, _ = self._read_file(aside)
        if moved is not None and moved.token != stale.token:
            # A racing run's fresh lease was renamed: put it back (unless yet another lease
            # appeared meanwhile) and look again.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return self._create(data)

    def _read_file(self, path: str) -> tuple[Lease | None, None]:
        try:
            with open(path, "rb") as f:
                return Lease(**json.loads(f.read())), None
        except (OSError, ValueError, TypeError):
            return None, None

    # -- the lease ----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease, or raise a UserError naming its live holder."""
        if self.remote:  # a missing bucket or no credentials: that line, not the lease's
            storage_client.check_location(self.folder, "checkpoint.dir")
        now = time.time()
        mine = Lease(
            socket.gethostname(),
            os.getpid(),
            _pid_start(os.getpid()),
            now,
            now,
            self.expires_s,
            uuid.uuid4().hex,
            os.environ.get("TORCHELASTIC_RUN_ID", ""),
        )
        data = json.dumps(asdict(mine)).encode()
        for _ in range(3):  # a lease that vanishes or changes while we look: look again
            if self._create(data):
                break
            held, etag = self._read()
            if held is None:
                continue
            why = holder_is_dead(held, time.time())
            if why is None and not _is_restart_of(held):
                raise UserError(
                    f"{self.folder} is in use by another run ({held.describe()}, last "
                    f"heartbeat {time.time() - held.heartbeat:.0f} s ago); stop that run, or "
                    f"give this one another train.run_dir / checkpoint.dir. If it is dead on "
                    f"another host, its lease expires {held.expires_s:.0f} s after its last "
                    f"heartbeat (or delete {self.path})"
                )
            took = (
                self._replace(data, etag, held.token)
                if self.remote
                else self._take_over_local(held, data)
            )
            if took:
                print(
                    f"warning: took over the lease on {self.folder} from a dead run "
                    f"({held.describe()}: {why or 'an earlier attempt of this job'})",
                    file=sys.stderr,
                    flush=True,
                )
                break
        else:
            raise UserError(
                f"could not take the run lease {self.path}: other runs keep "
                "changing it; stop them and start again"
            )
        self.lease = mine
        self._thread = threading.Thread(target=self._beat, name="triaxis-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        assert self.lease is not None
        while not self._stop.wait(self.heartbeat_s):
            self.lease.heartbeat = time.time()
            try:
                kept = self._replace(
                    json.dumps(asdict(self.lease)).encode(), self._etag, self.lease.token
                )
            except Exception as e:  # a storage hiccup: try again at the next beat
                print(
                    f"warning: could not refresh the run lease {self.path}: {e}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            if not kept:
                held, _ = self._read()
                self.lost = held.describe() if held else "(removed)"
                print(
                    f"warning: lost the run lease on {self.folder} to {self.lost}: this run "
                    "was silent for longer than the lease lasts; another run may now write "
                    "the same folder",
                    file=sys.stderr,
                    flush=True,
                )
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lease is None or self.lost:
            return
        try:
            held, _ = self._read()
            if held is not None and held.token == self.lease.token:
                storage.remove(self.path)
        except Exception as e:  # never mask how the run ended; the lease expires by itself
            print(
                f"warning: could not remove the run lease {self.path} ({e}); it expires "
                f"{self.expires_s:.0f} s after its last heartbeat",
                file=sys.stderr,
                flush=True,
            )
        self.lease = None


_warned_unconditional: list[bool] = []


def normalize(folder: str) -> str:
    """One spelling per folder: local paths absolute with symlinks resolved, URIs without a
    trailing slash."""
    folder = str(folder)
    return folder.rstrip("/") if storage.is_remote(folder) else os.path.realpath(folder)


def parents(folder: str) -> list[str]:
    """The folders above a normalized folder, nearest first (an object store's up to its
    bucket)."""
    if storage.is_remote(folder):
        scheme, _, rest = folder.partition("://")
        parts = rest.split("/")
        return [f"{scheme}://{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]
    out, up = [], os.path.dirname(folder)
    while up not in out and up != folder:
        out.append(up)
        folder, up = up, os.path.dirname(up)
    return out


def plan_leases(folders: list[str]) -> tuple[list[str], list[str]]:
    """(leased, nested): every folder a run writes once, normalized; a folder inside (or equal
    to) another one of them is covered by the outer one's lease."""
    unique = list(dict.fromkeys(normalize(f) for f in folders))
    nested = [f for f in unique if any(g in parents(f) for g in unique)]
    return [f for f in unique if f not in nested], nested


def check_not_held(folder: str, own_tokens: set[str]) -> None:
    """Refuse (a UserError naming the folder and the holder) if another live run holds a lease
    on `folder` or on a folder above it. A dead run's lease there is removed."""
    for where in [folder, *parents(folder)]:
        lock = RunLock(where)
        try:
            held, _ = lock._read()
        except (OSError, UserError):  # unreadable (a folder above, not ours): nothing to see
            continue
        if held is None or held.token in own_tokens or _is_restart_of(held):
            continue
        why = holder_is_dead(held, time.time())
        if why is None:
            inside = f"{folder} is inside {where}, which" if where != folder else f"{folder}"
            raise UserError(
                f"{inside} is in use by another run ({held.describe()}, last heartbeat "
                f"{time.time() - held.heartbeat:.0f} s ago); stop that run, or give this one "
                f"another train.run_dir / checkpoint.dir (or delete {lock.path} if that run "
                "is dead on another host)"
            )
        if where == folder:  # a dead run's lease left in a folder this run writes
            try:
                storage.remove(lock.path)
                print(
                    f"warning: took over the lease on {where} from a dead run "
                    f"({held.describe()}: {why})",
                    file=sys.stderr,
                    flush=True,
                )
            except OSError:
                pass


def _is_restart_of(held: Lease) -> bool:
    """The lease is this elastic job's, from an earlier attempt."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return (
        bool(job) and held.job == job and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    )


def _error_code(err: BaseException) -> str | None:
    for e in (err, err.__cause__):
        response = getattr(e, "response", None)  # None on some botocore errors
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code:
            return str(code)
    return None


def _precondition_failed(err: BaseException) -> bool:
    return _error_code(err) in ("PreconditionFailed", "412") or "PreconditionFailed" in str(err)


def _etag_of(response) -> str | None:
    return response.get("ETag") if isinstance(response, dict) else None
