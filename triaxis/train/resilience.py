"""Surviving failures inside a run: preemption (SIGTERM, Ctrl-C), one run per folder, and test
fault injection. (Bad losses: triaxis.train.numerics.)

Elastic restarts themselves come from the launcher (torchrun --max-restarts) plus auto-resume;
what lives here is what a running process must do by itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from triaxis.errors import UserError, os_error_line
from triaxis.parallel.host import host_all_reduce, new_host_group


class PreemptionWatch:
    """SIGTERM (spot interruption, scheduler preemption) or a first Ctrl-C (SIGINT) sets a
    flag; the loop asks should_stop() after every step, all ranks agreeing, and writes a final
    checkpoint before exiting with 128 + the signal (143, 130). A second Ctrl-C aborts at once,
    without a checkpoint. Under `triaxis launch` Ctrl-C reaches the launcher alone (workers run
    in sessions of their own); its agent passes SIGINT on to every worker and waits for them
    (--shutdown-timeout) before SIGKILL.

    With several ranks the agreement costs no host sync: the flag lives in host memory and is
    all-reduced over a gloo group of its own, started by one should_stop() and read by the next
    (a step later, when it has long completed). The device is never waited for; the price is
    that every rank stops one step after the signal instead of at the end of the current one."""

    def __init__(self, host_group=None) -> None:
        """`host_group`: a host group to share (parallel.host); else one is made here."""
        self.signal = 0
        """The first signal received (on any rank, once should_stop has agreed on it)."""
        self.agreed = False
        """Every rank has agreed to stop (sticky: should_stop stays True)."""
        self._group = None
        self._work = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Before the handlers: new_group waits in the store for every rank, and a peer that
            # failed earlier never comes. The agent's SIGTERM must still end this rank then
            # (a handler would only set the flag and leave it waiting until SIGKILL).
            # every rank builds the watch in fit()
            self._group = host_group if host_group is not None else new_host_group()
            self._flag = torch.zeros(1)
            self._host = self._flag.numpy()  # the same memory: read without a Tensor call
        self._old: dict[int, object] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (embedded use): no handler
                pass

    @property
    def requested(self) -> bool:
        return self.signal != 0

    def _on_signal(self, signum, frame) -> None:
        if self.signal and signum == signal.SIGINT:
            # Ctrl-C while the final checkpoint is written: the user wants out now. os._exit:
            # neither a background save nor the shutdown barrier may hold the process.
            print("interrupted again: exiting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)
        if not self.signal:
            self.signal = signum
            if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
                print(
                    "interrupted: saving a checkpoint at the end of this step (with several "
                    "ranks, the next one); Ctrl-C again to abort without one",
                    file=sys.stderr,
                    flush=True,
                )

    def should_stop(self) -> bool:
        """Whether to stop after this step. Called once per step on every rank: every rank
        answers True from the same step on."""
        if self.agreed:
            return True
        if self._group is None:
            self.agreed = self.requested
            return self.agreed
        if self._work is not None:
            self._work.wait()  # started a step ago: done, unless a peer is a step behind
            self._work = None
            if self._host[0]:
                self.signal = self.signal or int(self._host[0])
                self.agreed = True
                return True
        self._host[0] = self.signal
        self._work = host_all_reduce(self._flag, self._group, op=dist.ReduceOp.MAX, async_op=True)
        return False

    def finish(self) -> None:
        """After the last step (not after an error: a failed peer may never answer): the last
        all-reduce is complete on every rank before the group goes away."""
        if self._work is not None:
            self._work.wait()
            self._work = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def lock_folders(checkpoint_dir: str, run_dir: str) -> list[str]:
    """Every folder a run writes: its run folder (metrics.jsonl, config.toml, tb/) and its
    checkpoint folder. hold_run_lock covers each once, however they nest."""
    return [run_dir, checkpoint_dir]


@contextlib.contextmanager
def hold_run_lock(folders: list[str], is_main: bool):
    """Rank 0 takes the run lease on each folder before anything is written there (a folder
    nested in another is covered by the outer lease, and checked for another run's); every rank
    learns the outcome from one broadcast, so a refused run stops on all ranks at once (a
    UserError naming the holder) instead of leaving the others waiting in a collective."""
    from triaxis.checkpoint.lock import RunLock, check_not_held, plan_leases

    held: list[RunLock] = []
    refusal = ""
    if is_main:
        try:
            leased, nested = plan_leases(folders)
            for folder in leased:
                lock = RunLock(folder)
                lock.acquire()
                held.append(lock)
            ours = {lock.lease.token for lock in held if lock.lease is not None}
            for folder in leased + nested:  # and the folders above: another run's folder?
                check_not_held(folder, ours)
        except UserError as e:
            refusal = str(e)
        except OSError as e:  # a folder that cannot be written: every rank stops on its line
            refusal = os_error_line(e, folders) or ""
            if not refusal:
                raise
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    try:
        if refusal:
            raise UserError(refusal)
        yield held
    finally:
        for lock in reversed(held):
            lock.release()


# -- fault injection, for the tests of these features (documented in docs/resilience.md) ------


class InjectedFault(RuntimeError):
    """The error TRIAXIS_FAULT_ERROR raises: a stand-in for any bug or I/O failure on one rank."""


FAULT_POINTS = ("start", "forward", "checkpoint", "validation", "logging")
"""Where TRIAXIS_FAULT_ERROR can strike: the places a real failure meets its peers in different
collectives (before the first one, in FSDP's gathers, in the checkpoint's, in validation's
reduce, in the metrics reduce)."""


class Faults:
    """The test faults this process injects, parsed once from the environment when the Trainer
    starts (not on every step). All empty outside tests, and on every restart of an elastic
    job (TORCHELASTIC_RESTART_COUNT > 0): a fault strikes the first attempt only, so the
    restart can show the run recovering."""

    def __init__(self, environ=os.environ) -> None:
        first_attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        get = (lambda name: environ.get(name, "")) if first_attempt else (lambda name: "")
        self.kill: dict[int, int] = {}
        """TRIAXIS_FAULT_KILL="RANK:STEP,...": SIGKILL rank RANK as step STEP starts."""
        for item in filter(None, get("TRIAXIS_FAULT_KILL").split(",")):
            rank, step = item.split(":")
            self.kill[int(step)] = int(rank)
        # NaN poisoning is not limited to the first attempt: a rollback re-runs the step
        # within the same process, and the poison strikes the first time only.
        self.nan_steps = {
            int(s) for s in filter(None, environ.get("TRIAXIS_FAULT_NAN", "").split(","))
        }
        """TRIAXIS_FAULT_NAN="3,7": poison the loss the first time each of these steps runs."""
        self.points: dict[str, tuple[int, str, int]] = {}
        """TRIAXIS_FAULT_ERROR / TRIAXIS_FAULT_HANG = "RANK:POINT[@STEP]": {kind: (rank, point,
        step)}; each strikes once."""
        for kind in ("ERROR", "HANG"):
            text = get(f"TRIAXIS_FAULT_{kind}")
            if text:
                rank, _, rest = text.partition(":")
                point, _, step = rest.partition("@")
                assert point in FAULT_POINTS, (
                    f"TRIAXIS_FAULT_{kind}: point {point!r} not in {FAULT_POINTS}"
                )
                self.points[kind] = (int(rank), point, int(step or 0))
        delay = environ.get("TRIAXIS_FAULT_STEP_DELAY_S", "")
        self.step_delay_s = float(delay) if delay else 0.0
        """TRIAXIS_FAULT_STEP_DELAY_S: sleep this long before every forward (a slower run, to
        signal mid-run)."""

    def inject_nan(self, step: int) -> bool:
        if step in self.nan_steps:
            self.nan_steps.discard(step)
            return True
        return False

    def inject_kill(self, step: int, rank: int) -> None:
        if self.kill.get(step, -1) == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def inject_fault(self, point: str, rank: int, step: int = 0) -> None:
        """Raise (TRIAXIS_FAULT_ERROR) or hang forever (TRIAXIS_FAULT_HANG) on one rank the
        first time it reaches `point` at or after step STEP."""
        if point == "forward" and self.step_delay_s:
            time.sleep(self.step_delay_s)
        for kind, (f_rank, f_point, f_step) in list(self.points.items()):
            if f_rank == rank and f_point == point and step >= f_step:
                del self.points[kind]  # once
                if kind == "ERROR":
                    raise InjectedFault(f"injected fault at {point}, step {step}, rank {rank}")
                while True:  # a rank stuck outside any collective (a dead file system, deadlock)
                    time.sleep(3600)
