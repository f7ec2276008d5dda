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

from triaxis.config import TrainConfig
from triaxis.errors import UserError
from triaxis.train.optim import rewind_scheduler


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
            loss = loss.detach().float().to(norm.device)
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


class Numerics:
    """The numerics guard as the loop carries it: the device flags, the host's judgement,
    the batches never to train on again, and what a bad step does: `skip` takes the step back
    (the step count and the LR schedule as if it never ran), `rollback` returns to the last
    checkpoint; `off` checks nothing."""

    def __init__(self, cfg: TrainConfig, log, on: bool = True) -> None:
        """`on=False`: no checks whatever cfg says (a Trainer before fit())."""
        self.rollback, self.log = cfg.on_bad_loss == "rollback", log
        self.guard = (
            NumericsGuard(cfg.spike_factor, cfg.max_bad_steps)
            if on and cfg.on_bad_loss != "off"
            else None
        )
        self.checks = None if self.guard is None else DeviceChecks(self.guard)
        self.skip_cursors: set[int] = set()
        """Batches (sample cursors) never to train on again: a bad step's, kept across resumes."""

    # What the loop carries from step to step besides weights, optimizer, LR schedule and data
    # cursor (those are the checkpoint's own state): saved with every checkpoint, restored on
    # resume, so a killed and resumed run repeats the uninterrupted one exactly. Nothing else
    # carries over: no step draws random numbers (the data order is a pure function of seed and
    # position; there is no dropout), and the pipeline schedules start every step afresh.
    def state(self) -> dict:
        state: dict = {"skip_cursors": sorted(self.skip_cursors)}
        if self.guard is not None:
            state["guard"] = self.guard.state()
        return state

    def restore(self, state: dict, rollback: bool = False) -> None:
        """After a resume; or after a rollback, which returns the running mean to the
        checkpoint's but keeps counting bad steps and keeps every batch already marked."""
        self.skip_cursors |= set(state.get("skip_cursors", ()))
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state(state["guard"], rollback)

    def settle(self) -> tuple[float | None, list[BadStep]]:
        return self.checks.settle() if self.checks is not None else (None, [])

    def handle(
        self, bad: list[BadStep], step: int, cursor: int, ckpt, scheduler
    ) -> tuple[int, int]:
        """Bad steps found by settle(): count them (past max_bad_steps the run stops), never
        train on their batches again, then skip or roll back. Returns the (step, cursor) to
        continue from."""
        assert self.guard is not None
        for b in bad:
            self.skip_cursors.add(b.cursor)
            self.guard.count(b)
        first = bad[0]
        if self.rollback:
            ckpt.wait()
            resumed = ckpt.resume()
            if resumed is not None:
                state = resumed[1]
                self.restore(state.get("loop_state", {}), rollback=True)
                self.log.warn(
                    f"step {first.step}: {first.reason}; rolled back to step {state['step']} "
                    f"and skipping the batch at sample cursor {first.cursor}"
                )
                return state["step"], state["cursor"]
            self.log.warn(f"step {first.step}: {first.reason}; no checkpoint to roll back to")
        for b in bad:
            self.log.warn(
                f"step {b.step}: {b.reason}; update skipped, batch at sample cursor "
                f"{b.cursor} dropped"
            )
        rewind_scheduler(scheduler, len(bad))
        return step - len(bad), cursor
