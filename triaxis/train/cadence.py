"""Which steps the host looks at: logging, validation, checkpoints, a planned exit.

Only these steps read values from the device (the loss, the numerics flags, the checkpoint's
agreement); every other step is queued behind the previous one without the host waiting for
it. See docs/resilience.md (no per-step host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

from triaxis.config import Config


@dataclass(frozen=True)
class Cadence:
    steps: int
    first_step: int
    """The step this invocation started from (resume)."""
    log_every: int
    val_every: int
    """0 = no validation (also without validation data)."""
    checkpoint_every: int
    save_final: bool
    exit_after: int
    memory_every: int = 0
    """checkpoint.memory_interval (0 = no memory tier)."""

    @classmethod
    def of(cls, cfg: Config, first_step: int, has_val: bool) -> Cadence:
        return cls(
            steps=cfg.train.steps,
            first_step=first_step,
            log_every=cfg.metrics.log_every,
            val_every=cfg.train.val_every if has_val else 0,
            checkpoint_every=cfg.checkpoint.interval,
            save_final=cfg.checkpoint.save_final,
            exit_after=cfg.train.exit_after_steps,
            memory_every=cfg.checkpoint.memory_interval,
        )

    def logs(self, step: int) -> bool:
        # The first step of an invocation too: the starting loss, to see it fall.
        return step % self.log_every == 0 or step == self.steps or step == self.first_step + 1

    def validates(self, step: int) -> bool:
        return bool(self.val_every) and step % self.val_every == 0

    def saves(self, step: int) -> bool:
        return bool(self.checkpoint_every and step % self.checkpoint_every == 0) or (
            step == self.steps and self.save_final
        )

    def exits(self, step: int) -> bool:
        """train.exit_after_steps: save and leave after this step (not at the last: it ends)."""
        return (
            bool(self.exit_after)
            and step - self.first_step >= self.exit_after
            and step != self.steps
        )

    def syncs(self, step: int) -> bool:
        """Whether the host reads device values after this step."""
        # A memory-tier copy too: the loop state it carries is settled only on a syncing step.
        memory = bool(self.memory_every) and step % self.memory_every == 0
        return (
            self.logs(step)
            or self.validates(step)
            or self.saves(step)
            or self.exits(step)
            or memory
        )
