"""The float8 size filter, without torch: the trainer's conversion (parallel/float8.py) and the
planner's pricing (plan/float8.py) share it, and the planner must start without torch."""

from __future__ import annotations


def eligible_dims(in_features: int, out_features: int, min_dim: int) -> bool:
    """Both features at least train.float8_min_dim and divisible by 16 (float8 GEMM kernels
    tile by 16)."""
    return all(d >= min_dim and d % 16 == 0 for d in (in_features, out_features))
