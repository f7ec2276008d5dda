"""Where a starting run's state comes from, in order: the memory tier (when it holds a step at
least as new as storage, on every rank), the newest valid durable checkpoint, the initial
weights of checkpoint.initial, or nothing (a fresh start)."""

from __future__ import annotations


def restored_state(cfg, ckpt, memory, log) -> dict | None:
    """{"step", "cursor", "loop_state"} of the restored run, or None for step 0."""
    if memory is not None and cfg.checkpoint.resume == "auto":
        state = memory.restore()
        if state is not None:
            return state
    resumed = ckpt.resume(cfg.checkpoint.resume)
    if resumed is not None:
        found, state = resumed
        log.info(
            f"resumed from {found.path} at step {state['step']} (sample cursor {state['cursor']})"
        )
        return state
    if cfg.checkpoint.initial:
        ckpt.load_initial(cfg.checkpoint.initial)
        log.info(f"initial weights from {cfg.checkpoint.initial}")
    return None
