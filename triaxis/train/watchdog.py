"""A rank that stops making progress ends the job with one line naming it.

Each rank runs a thread that expects a heartbeat (`beat()`, once per loop iteration) at least
every `train.hang_timeout_s`. When one is late, the thread

1. dumps every thread's Python stack of this rank (faulthandler, to stderr),
2. says where the main thread is: inside torch.distributed (waiting in a collective, and
   which) or elsewhere (the file, line and function: this rank is the stuck one),
3. publishes that in the job's store and reads the other ranks' answers for a short grace
   period (they time out at about the same time: they wait for the stuck rank),
4. exits with one line naming the stuck rank(s) (through the error file `triaxis launch`
   prints), which makes the agent stop the rest of the job.

With torch's Flight Recorder on (TORCH_FR_BUFFER_SIZE), each rank first writes its records
to RUN_DIR/flight_recorder (before step 3, so that every rank that answers has written its
dump), and the line adds what the records say: which rank never entered collective k of
which group (metrics/hang.py). That needs no Python stacks, and it holds under NCCL, where the
rank whose Python sits in a collective is not always the one that failed to enter it.

A hang in a collective whose peers are all in collectives too (mismatched collectives) names
every rank and the collective each waits in.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from datetime import timedelta
from types import FrameType

from triaxis.metrics import flight, hang
from triaxis.train.distributed import report_and_exit

_TORCH_DISTRIBUTED = os.sep + os.path.join("torch", "distributed") + os.sep


def main_thread_place() -> tuple[bool, str]:
    """(in_collective, where) for the main thread's current frame."""
    frame: FrameType | None = sys._current_frames().get(threading.main_thread().ident)
    innermost, collective = None, None
    while frame is not None:
        code = frame.f_code
        here = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        innermost = innermost or here
        if collective is None and _TORCH_DISTRIBUTED in code.co_filename:
            collective = f"{code.co_name} ({_short(code.co_filename)}:{frame.f_lineno})"
        frame = frame.f_back
    if collective is not None:
        return True, collective
    return False, _short(innermost or "?")


def _short(path: str) -> str:
    for marker in ("site-packages" + os.sep, "triaxis" + os.sep):
        if marker in path:
            return path[path.index(marker) + (len(marker) if marker.startswith("site") else 0) :]
    return path


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int, run_dir: str = ""):
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.run_dir = run_dir
        """Where the Flight Recorder dumps go (none when empty)."""
        self.step = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None

    def start(self) -> None:
        if self.timeout_s <= 0:
            return
        if self.run_dir and flight.enabled():
            flight.discard(self.run_dir, self.rank)
        if (
            self.world_size > 1
            and os.environ.get("TORCHELASTIC_RUN_ID")
            and os.environ.get("MASTER_ADDR")
        ):
            # A connection of its own to torchrun's store (served by the agent, so it outlives
            # any worker): the main thread may be blocked while holding the default one.
            import torch.distributed as dist

            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            try:
                store = dist.TCPStore(
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    is_master=False,
                    timeout=timedelta(seconds=30),
                )
                self._store = dist.PrefixStore(f"triaxis_watchdog_{attempt}", store)
            except (RuntimeError, OSError, ValueError) as e:  # then each rank names only itself
                print(
                    f"watchdog: rank {self.rank}: no store to compare ranks ({e})",
                    file=sys.stderr,
                    flush=True,
                )
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="triaxis-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step = step
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        period = min(5.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            if time.monotonic() - self._last > self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        in_collective, where = main_thread_place()
        print(
            f"watchdog: rank {self.rank}: no progress for {self.timeout_s:g} s after step "
            f"{self.step}; Python stacks of this rank:",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        dumped = self._dump_flight_records()
        places = self._gather(f"{int(in_collective)}|{self.step}|{where}")
        places.setdefault(self.rank, f"{int(in_collective)}|{self.step}|{where}")
        stuck = {r: p for r, p in places.items() if p.startswith("0|")}
        waiting = {r: p for r, p in places.items() if p.startswith("1|")}
        named = stuck or waiting
        parts = [
            f"rank {r} at step {p.split('|')[1]}, "
            f"{'in torch.distributed ' if p.startswith('1|') else 'at '}{p.split('|', 2)[2]}"
            for r, p in sorted(named.items())
        ]
        line = (
            f"no progress for {self.timeout_s:g} s (train.hang_timeout_s): "
            f"stuck rank(s) {sorted(named)}: {'; '.join(parts)}"
        )
        if stuck and waiting:
            line += f"; rank(s) {sorted(waiting)} waiting for them in collectives"
        if len(places) < self.world_size:
            line += f" ({self.world_size - len(places)} rank(s) did not answer)"
        line += "; Python stacks above"
        if dumped:
            line += f". {self._flight_verdict()}"
        report_and_exit(self.rank, line, exit_code=1, kind="hang")

    def _dump_flight_records(self) -> bool:
        if not self.run_dir:
            return False
        try:
            return flight.dump(self.run_dir, self.rank) is not None
        except Exception as e:  # noqa: BLE001 - the stack-based line must still come out
            print(f"watchdog: rank {self.rank}: no Flight Recorder dump ({e})", file=sys.stderr)
            return False

    def _flight_verdict(self) -> str:
        folder = os.path.join(self.run_dir, flight.FLIGHT_DIR)
        try:
            found = hang.verdict(hang.load(self.run_dir), self.world_size)
            return f"Flight Recorder ({folder}): {found}"
        except Exception as e:  # noqa: BLE001 - a dump a peer left half-read: say so, go on
            return f"Flight Recorder ({folder}): not analyzed ({e})"

    def _gather(self, mine: str) -> dict[int, str]:
        """Every rank's place, as far as they answer within a grace period."""
        if self._store is None:
            return {}
        out: dict[int, str] = {}
        try:
            self._store.set(f"place/{self.rank}", mine)
            deadline = time.monotonic() + max(5.0, min(30.0, self.timeout_s))
            while len(out) < self.world_size and time.monotonic() < deadline:
                for r in range(self.world_size):
                    if r not in out and self._store.check([f"place/{r}"]):
                        out[r] = self._store.get(f"place/{r}").decode()
                time.sleep(0.2)
        except Exception as e:  # the store is gone (agent stopped): name what we know
            print(
                f"watchdog: rank {self.rank}: could not reach the other ranks ({e})",
                file=sys.stderr,
                flush=True,
            )
        return out
