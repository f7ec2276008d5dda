"""What a logged record says about the steps behind it, without a host sync per step.

The gradient norm of each log step (pre-clip, the one clipping computed anyway) and whether
clipping applied stay device tensors until the log step reads them. The step-time breakdown is
measured on the device's own clock: on a GPU by CUDA events (recorded as the host queues the
work, read only on the log step, when the device has caught up), on a CPU by the host clock,
which there is the device's. Data wait is host time (triaxis.train.loop.Trainer.local_batch).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

PHASES = ("fwd_bwd", "optimizer")
"""The timed phases of a step; `fwd_bwd` includes reading the batches, which `span_s` then
leaves out (data_wait_s is its own column)."""


class StepStats:
    def __init__(self, device: torch.device, grad_clip: float) -> None:
        self.device, self.grad_clip = device, grad_clip
        self.events = device.type == "cuda"
        self.spans: dict[str, list] = defaultdict(list)
        """Per phase since the last read: (start, end) CUDA events, or seconds on a CPU."""
        self.norm: torch.Tensor | None = None

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of this step; nothing waits for the device."""
        if self.events:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.spans[name].append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self.spans[name].append(time.perf_counter() - t0)

    def grad(self, norm: torch.Tensor) -> None:
        """The pre-clip gradient norm of a log step (kept on the device until read)."""
        self.norm = norm.detach()

    def read(self, steps: int, data_wait_s: float) -> dict[str, float]:
        """Seconds per step of each phase since the last read (this rank's; the caller takes
        the slowest rank), fwd_bwd without this rank's `data_wait_s` (the window's total)."""
        out = {}
        for name in PHASES:
            spans = self.spans.pop(name, [])
            if self.events:  # the host has synced on this log step: the events are done
                total_s = sum(s.elapsed_time(e) for s, e in spans) / 1e3
            else:
                total_s = sum(spans)
            out[f"{name}_s"] = total_s / max(1, steps)
        out["fwd_bwd_s"] = max(0.0, out["fwd_bwd_s"] - data_wait_s / max(1, steps))
        return out

    def grad_record(self) -> dict:
        """grad_norm (pre-clip) and grad_clipped of the last log step: one host read."""
        if self.norm is None:
            return {}
        norm, self.norm = float(self.norm), None  # a log step: the host reads anyway
        clipped = bool(self.grad_clip > 0 and norm > self.grad_clip)
        return {"grad_norm": norm, "grad_clipped": clipped}
