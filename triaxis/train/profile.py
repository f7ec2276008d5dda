"""Profiler traces of chosen steps: `[profile] steps = "5-6"`, or SIGUSR2 for the next N.

One Chrome/Perfetto trace per rank (chrome://tracing or ui.perfetto.dev opens it) in
RUN_DIR/profile/steps_A-B/rank_R.json; with `memory_snapshot` on a GPU, the CUDA allocator's
history over the same steps beside it (rank_R_memory.pickle, for torch.cuda.memory._memory_viz).
A traced step waits for the device when the trace ends: profile away from timed steps.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from triaxis.config.sections import ProfileConfig
from triaxis.errors import UserError


def parse_steps(text: str) -> tuple[int, int] | None:
    """ "A-B" or "A" -> (A, B), steps counted from 1; "" -> None."""
    if not text.strip():
        return None
    parts = text.split("-")
    try:
        first, last = int(parts[0]), int(parts[-1])
    except ValueError:
        first = last = 0
    if len(parts) > 2 or first < 1 or last < first:
        raise UserError(
            f'profile.steps="{text}": give a step "A" or a range "A-B" with 1 <= A <= B, e.g. "5-6"'
        )
    return first, last


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, device: torch.device, run_dir: str, rank: int, log):
        self.window = parse_steps(cfg.steps)
        if cfg.memory_snapshot and device.type != "cuda":
            raise UserError(
                f"profile.memory_snapshot=true records the CUDA allocator, but this run is on "
                f"{device.type}; drop it or train on a GPU (--train.device=cuda)"
            )
        self.cfg, self.device, self.rank, self.log = cfg, device, rank, log
        self.dir = Path(run_dir) / "profile"
        self.prof: torch.profiler.profile | None = None
        self.span: tuple[int, int] = (0, 0)
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGUSR2, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True  # acted on before the next step: never inside one

    def before(self, step: int) -> None:
        """Step `step` (counted from 1) is about to run: start tracing if it is asked for."""
        if self.prof is not None:
            return
        if self.requested:
            self.requested = False
            self.span = (step, step + self.cfg.signal_steps - 1)
        elif self.window is not None and self.window[0] <= step <= self.window[1]:
            self.span = (step, self.window[1])
        else:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.cfg.memory_snapshot:
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.start()

    def after(self, step: int) -> None:
        """Step `step` has been queued: at the end of the span, stop and write the trace."""
        if self.prof is not None and step >= self.span[1]:
            self._finish()

    def _finish(self) -> None:
        assert self.prof is not None
        self.prof.stop()  # waits for the device: the trace holds the steps' kernels
        prof, self.prof = self.prof, None
        out = self.dir / f"steps_{self.span[0]}-{self.span[1]}"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank_{self.rank}.json"
        tmp = path.with_name(path.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(path)  # a trace is complete or absent
        if self.device.type == "cuda" and self.cfg.memory_snapshot:
            torch.cuda.memory._dump_snapshot(str(out / f"rank_{self.rank}_memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.log.info(f"profile: steps {self.span[0]}-{self.span[1]} traced in {out}")

    def close(self) -> None:
        """End of the run: a span cut short is still written; the signal handler is undone."""
        if self.prof is not None:
            self._finish()
        if self.previous is not None:
            signal.signal(signal.SIGUSR2, self.previous)
            self.previous = None
