"""Module-name patterns, without torch: LoRA's targets are matched by the trainer
(parallel/lora.py) and priced by the planner (plan/lora.py), and the planner starts without
torch."""

from __future__ import annotations

import fnmatch


def matches(name: str, pats: list[str]) -> bool:
    """A pattern matches a Linear's full name or any dotted tail of it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in pats)
