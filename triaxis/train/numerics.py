"""The numerics guard, without a host sync per step.

Every step, the gradient norm (computed for clipping anyway, over all ranks) gives a device-side
flag; on log steps the flag also covers the step's loss (its mean over the data-parallel ranks,
which the log needs anyway): non-finite, or above `spike_factor` x the running mean of the
logged losses. The fused AdamW makes the update a no-op when the flag is set (`found_inf`, as
GradScaler uses it; its step count is not advanced either). Nothing is read on the host: the
flags wait here until the next step that syncs anyway (a log, validation or checkpoint step,
a stop), where one read settles them all. Every decision is taken from the flags, which are
the same on every rank, so every rank skips the same updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from triaxis.errors import UserError


@dataclass
class BadStep:
    """A step whose update the device skipped."""

    step: int
    """The step it was to be (the steps after it in the same window were counted one too high
    until now)."""
    cursor: int
    """Sample cursor of its batch."""
    reason: str


class NumericsGuard:
    """The host side: the running mean of the logged losses (for spikes) and the count of bad
    steps (past max_bad_steps the run stops)."""

    def __init__(self, spike_factor: float, max_bad_steps: int, warmup_steps: int = 10):
        self.spike_factor, self.max_bad = spike_factor, max_bad_steps
        self.warmup, self.seen, self.mean = warmup_steps, 0, 0.0
        self.bad_steps = 0

    def spike_threshold(self) -> float | None:
        """A logged loss above this is a spike; None while there is no running mean to judge
        by (the first `warmup_steps` logged losses) or with spike_factor = 0."""
        if not self.spike_factor or self.seen < self.warmup:
            return None
        return self.spike_factor * self.mean

    def observe(self, loss: float) -> None:
        """A logged loss of a step that was not skipped joins the running mean."""
        self.mean = loss if self.seen == 0 else 0.9 * self.mean + 0.1 * loss
        self.seen += 1

    def state(self) -> dict:
        """For the checkpoint's loop state (a resumed run judges as the uninterrupted one)."""
        return {"seen": self.seen, "mean": self.mean, "bad_steps": self.bad_steps}

    def load_state(self, state: dict, rollback: bool = False) -> None:
        """A rollback returns the running mean to the checkpoint's but keeps counting bad steps
        (else max_bad_steps could never stop a run that keeps rolling back)."""
        self.seen, self.mean = int(state["seen"]), float(state["mean"])
        if not rollback:
            self.bad_steps = int(state["bad_steps"])

    def count(self, bad: BadStep) -> None:
        self.bad_steps += 1
        if self.bad_steps > self.max_bad:
            raise UserError(
                f"training stopped at step {bad.step}: {self.bad_steps} bad steps "
                f"(last: {bad.reason}, batch at sample cursor {bad.cursor}) exceed "
                f"train.max_bad_steps={self.max_bad}; lower train.lr, check the data "
                "at that cursor, or raise train.max_bad_steps"
            )


@dataclass
class _Pending:
    step: int
    cursor: int
    flag: torch.Tensor
    """Device bool: the update was skipped."""
    norm: torch.Tensor
    loss: torch.Tensor | None
    """The mean loss over data-parallel ranks, on log steps."""
    threshold: float | None
    """The spike threshold it was judged by."""


class DeviceChecks:
    """The device side: one flag per step, read in one go at the next sync point."""

    def __init__(self, guard: NumericsGuard) -> None:
        self.guard = guard
        self.pending: list[_Pending] = []

    def flag(
        self, step: int, cursor: int, norm: torch.Tensor, loss: torch.Tensor | None
    ) -> torch.Tensor:
        """The found_inf for this step's update (a float 0/1 tensor on the norm's device), from
        the gradient norm and, on log steps, the mean loss; kept until settle()."""
        bad = ~torch.isfinite(norm)
        threshold = None
        if loss is not None:
            loss = loss.detach().to(norm.device)
            bad = bad | ~torch.isfinite(loss)
            threshold = self.guard.spike_threshold()
            if threshold is not None:
                bad = bad | (loss > threshold)
        self.pending.append(_Pending(step, cursor, bad, norm.detach(), loss, threshold))
        return bad.float()

    def settle(self) -> tuple[float | None, list[BadStep]]:
        """One host read of every flag since the last call: (the last logged loss, if the last
        step logged, else None; the bad steps, oldest first, with the step each was to be)."""
        if not self.pending:
            return None, []
        nan = torch.full((), math.nan, device=self.pending[0].norm.device)
        rows = torch.stack(
            [
                torch.stack([p.flag.float(), p.norm.float(), nan if p.loss is None else p.loss])
                for p in self.pending
            ]
        ).tolist()  # the one host sync
        pending, self.pending = self.pending, []
        bad: list[BadStep] = []
        for p, (flag, norm, loss) in zip(pending, rows):
            if not flag:
                if p.loss is not None:
                    self.guard.observe(loss)
                continue
            if p.loss is not None and not math.isfinite(loss):
                reason = f"non-finite loss {loss}"
            elif not math.isfinite(norm):
                reason = f"non-finite gradients (norm {norm})"
            else:
                reason = (
                    f"loss spike {loss:.4f} > {self.guard.spike_factor} x running mean "
                    f"{p.threshold / self.guard.spike_factor:.4f}"
                )
            bad.append(BadStep(p.step - len(bad), p.cursor, reason))
        last = pending[-1]
        return (None if last.loss is None else rows[-1][2]), bad
