"""Surviving failures inside a run: preemption (SIGTERM), bad losses, and test fault injection.

Elastic restarts themselves come from the launcher (torchrun --max-restarts) plus auto-resume;
what lives here is what a running process must do by itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from triaxis.errors import UserError


class PreemptionWatch:
    """SIGTERM (spot interruption, scheduler preemption) or a first Ctrl-C (SIGINT) sets a
    flag; the loop checks it after every step, all ranks agreeing, and writes a final
    checkpoint before exiting with 128 + the signal (143, 130). A second Ctrl-C aborts at once,
    without a checkpoint. Under `triaxis launch` Ctrl-C reaches the launcher alone (workers run
    in sessions of their own); its agent passes SIGINT on to every worker and waits for them
    (--shutdown-timeout) before SIGKILL."""

    def __init__(self) -> None:
        self.signal = 0
        """The first signal received (on any rank, once should_stop has agreed on it)."""
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
                    "interrupted: saving a checkpoint at the end of this step "
                    "(Ctrl-C again to abort without one)",
                    file=sys.stderr,
                    flush=True,
                )

    def should_stop(self) -> bool:
        flag = torch.tensor([float(self.signal)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            # One rank's signal stops every rank at the same step (gloo side group not needed:
            # a one-element all-reduce on the default group is cheap).
            flag = flag.to("cuda") if dist.get_backend() == "nccl" else flag
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signal = self.signal or int(flag.item())
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def lock_folders(checkpoint_dir: str, run_dir: str) -> list[str]:
    """The folders a run writes: its checkpoint folder, and its run folder when the
    checkpoints live elsewhere (metrics.jsonl and config.toml must not interleave either)."""
    from pathlib import Path

    folders = [checkpoint_dir]
    if (
        "://" in checkpoint_dir
        or Path(run_dir).resolve() not in Path(checkpoint_dir).resolve().parents
    ):
        folders.append(run_dir)
    return folders


@contextlib.contextmanager
def hold_run_lock(folders: list[str], is_main: bool):
    """Rank 0 takes the run lease on each folder before anything is written there; every rank
    learns the outcome from one broadcast, so a refused run stops on all ranks at once (a
    UserError naming the holder) instead of leaving the others waiting in a collective."""
    from triaxis.checkpoint.lock import RunLock

    held: list[RunLock] = []
    refusal = ""
    if is_main:
        try:
            for folder in folders:
                lock = RunLock(folder)
                lock.acquire()
                held.append(lock)
        except UserError as e:
            refusal = str(e)
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


class NumericsGuard:
    """Flags a non-finite loss, or one over spike_factor x the running mean of recent losses."""

    def __init__(self, spike_factor: float, max_bad_steps: int, warmup_steps: int = 10):
        self.spike_factor, self.max_bad = spike_factor, max_bad_steps
        self.warmup, self.seen, self.mean = warmup_steps, 0, 0.0
        self.bad_steps = 0

    def check(self, loss: float, step: int, cursor: int) -> str | None:
        """None if the loss is fine (and it joins the running mean), else the reason."""
        reason = None
        if not math.isfinite(loss):
            reason = f"non-finite loss {loss}"
        elif (
            self.spike_factor and self.seen >= self.warmup and loss > self.spike_factor * self.mean
        ):
            reason = f"loss spike {loss:.4f} > {self.spike_factor} x running mean {self.mean:.4f}"
        if reason is None:
            self.mean = loss if self.seen == 0 else 0.9 * self.mean + 0.1 * loss
            self.seen += 1
            return None
        self.bad_steps += 1
        if self.bad_steps > self.max_bad:
            raise UserError(
                f"training stopped at step {step}: {self.bad_steps} bad steps "
                f"(last: {reason}, batch at sample cursor {cursor}) exceed "
                f"train.max_bad_steps={self.max_bad}; lower train.lr, check the data "
                "at that cursor, or raise train.max_bad_steps"
            )
        return reason


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
