"""Process-group set-up and tear-down, from torchrun's environment (or none: one process)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from triaxis.errors import UserError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool
    """True when this process created the process group (and so must destroy it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "train.device='cuda' but no CUDA GPU is visible; use --train.device=cpu or auto"
        )
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def staged_for_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """`t` in a contiguous host buffer (pinned if `pin`), ready for a non-blocking host-to-device
    copy. Contiguous matters as much as pinned: a strided source (a batch's `tokens[:, :-1]`
    keeps its strides through `pin_memory()`) makes the CUDA copy first make it contiguous in
    a fresh pageable buffer, then copy from there, synchronously."""
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    return staged.copy_(t)


LAUNCHER_PID_ENV = "TRIAXIS_LAUNCHER_PID"
"""Set by `triaxis launch` for its workers: the pid whose death must end them."""
_PR_SET_PDEATHSIG = 1


def die_with_launcher(environ=os.environ) -> None:
    """Have the kernel SIGKILL this worker when its launcher dies. torch elastic starts
    workers in sessions of their own, so a SIGKILL of the launcher (or of its process group)
    used to leave them training and committing checkpoints into a folder a restarted job then
    shares. The launcher's own pid is checked after the request: if it died before, this
    process has already been re-parented and leaves at once."""
    expected = environ.get(LAUNCHER_PID_ENV)
    if not expected or int(expected) == os.getpid() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here (some sandboxes): the launcher's own cleanup remains
    if os.getppid() != int(expected):
        os._exit(128 + signal.SIGKILL)


TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets beside WORLD_SIZE for each worker; a job needs them all."""


def torchrun_env(environ=os.environ) -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's variables, checked: a WORLD_SIZE left in
    a shell (or half of a launcher's variables) must not fail later as a KeyError."""
    fix = (
        "start the job with `triaxis launch` (or torchrun), which sets them all, or set them "
        "yourself (or unset WORLD_SIZE to train in one process)"
    )

    def number(name: str, default: str, low: int, high: int | None = None) -> int:
        text = environ.get(name, default)
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise UserError(f"{name}={text!r} must be a whole number {bound}; {fix}")
        return value

    world = number("WORLD_SIZE", "1", 1)
    if world > 1:
        missing = [v for v in TORCHRUN_VARS if not environ.get(v)]
        if missing:
            raise UserError(
                f"WORLD_SIZE={world} is set but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: {fix}"
            )
        number("MASTER_PORT", "", 1, 65535)
    rank = number("RANK", "0", 0, world - 1)
    local = number("LOCAL_RANK", "0", 0)
    return world, rank, local


def init_distributed(
    requested_device: str, timeout_s: float = 600.0, need_group: bool = False
) -> DistEnv:
    """Join the job's process group: NCCL on GPUs, gloo on CPU. A group made by the caller
    (tests) is used as it is. One process gets a group of its own only if `need_group`
    (FSDP wrapping at world size 1). `timeout_s` (train.dist_timeout_s) bounds every wait for
    the peers: the store, the group's connections, later groups and gloo collectives."""
    die_with_launcher()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local, pick_device(requested_device, local), False)
    world, rank, local = torchrun_env(os.environ)
    device = pick_device(requested_device, local)
    if world == 1 and not need_group:
        return DistEnv(0, 1, 0, device, False)
    if world == 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            device_id=device if device.type == "cuda" else None,
        )
        return DistEnv(0, 1, 0, device, True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A fresh store prefix per elastic restart: re-using the previous attempt's keys made
    # rendezvous read stale peer addresses and hang (see shared notes on torchrun restarts).
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timeout,
        )
    except (RuntimeError, OSError) as e:  # DistNetworkError: nobody serves the store
        _cannot_join(
            rank,
            f"the store at {endpoint} did not answer within {timeout_s:g} s "
            f"({_first_line(e)}); check that the launcher (torchrun) on the first node is "
            "running and reachable (network, firewall), or raise train.dist_timeout_s on a "
            "loaded machine",
        )
    store = dist.PrefixStore(f"triaxis_attempt_{attempt}", store)
    store.add(_JOINED_KEY, 1)  # counted for the error below: who never came
    try:
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    except dist.DistStoreError as e:
        _cannot_join(
            rank,
            f"the process group did not form within {timeout_s:g} s: {_joined(store)} of "
            f"{world} ranks joined at {endpoint} ({_first_line(e)}); check that every node "
            "runs the same launch command and reaches that address (network, firewall), or "
            "raise train.dist_timeout_s on a loaded machine",
        )
    return DistEnv(rank, world, local, device, True)


_JOINED_KEY = "triaxis_joined"


def _cannot_join(rank: int, line: str) -> NoReturn:
    """A user's (or the machine's) problem, not a bug: one line, exit 2, through the error
    file under torchrun (the launcher prints it once), printed here otherwise."""
    report_and_exit(rank, line, exit_code=UserError.exit_code)


def _joined(store) -> str:
    try:
        return str(store.add(_JOINED_KEY, 0))
    except (RuntimeError, OSError):
        return "?"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        # Without this barrier ranks sometimes abort at exit while a peer still sends.
        dist.barrier()
        dist.destroy_process_group()


def failure_line(err: BaseException) -> str:
    """The one line that says why a rank stopped: a UserError's own message, else the
    exception's type and message (its traceback goes to the error file)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (second Ctrl-C)"
    return f"{type(err).__name__}: {err}".strip()


def exit_code_of(err: BaseException) -> int:
    if isinstance(err, UserError):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return 130
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) and err.code else 1
    return 1


def write_error_file(
    path: str, rank: int, line: str, tb: str = "", exit_code: int = 1, kind: str = "error"
) -> None:
    """torch elastic's per-worker error file (TORCHELASTIC_ERROR_FILE): the agent reads it when
    the worker exits non-zero, and `triaxis launch` prints the first failing rank's line from
    it. `time` is precise (torch's own timestamp is whole seconds) so the launcher can tell the
    rank that failed first from peers that failed because it was gone."""
    data = {
        "message": {
            "message": line,
            "extraInfo": {"py_callstack": tb or line, "timestamp": str(int(time.time()))},
        },
        "triaxis": {
            "rank": rank,
            "line": line,
            "traceback": tb,
            "time": time.time(),
            "kind": kind,
            "exit_code": exit_code,
        },
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def report_and_exit(
    rank: int, line: str, tb: str = "", exit_code: int = 1, kind: str = "error"
) -> NoReturn:
    """Leave now: under torchrun the cause goes to the error file for `triaxis launch` to print
    once (every rank may meet the same error); elsewhere it is printed here."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    try:
        if error_file:
            write_error_file(error_file, rank, line, tb, exit_code, kind)
        else:
            if tb:
                print(tb.rstrip(), file=sys.stderr)
            print(f"error: rank {rank}: {line}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(exit_code)


def leave_on_error(env: DistEnv, err: BaseException) -> None:
    """Returns only for one process (or a group the caller made): the error is raised as usual
    there. A rank of a job this process joined leaves at once (fail_fast)."""
    if env.owns_group and env.world_size > 1:
        fail_fast(env, err)


def fail_fast(env: DistEnv, err: BaseException) -> NoReturn:
    """A rank of a multi-process job that hits an error leaves at once: it must not enter the
    shutdown barrier (its peers sit in some other collective, so both would wait for the
    collective timeout), nor wait for background threads (an async checkpoint's collectives).
    Its exit makes the agent stop the other workers within a second, and its peers' pending
    collectives fail as soon as its sockets close. Under torchrun the cause goes to the error
    file for `triaxis launch` to print once; elsewhere it is printed here."""
    tb = (
        ""
        if isinstance(err, (UserError, KeyboardInterrupt))
        else "".join(traceback.format_exception(type(err), err, err.__traceback__))
    )
    report_and_exit(env.rank, failure_line(err), tb, exit_code_of(err))
