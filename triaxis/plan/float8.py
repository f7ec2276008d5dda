"""The planner's price of FP8 training (train.float8, triaxis.parallel.float8).

A converted linear (a block's wq/wk/wv/wo/w1/w2/w3 whose in and out features pass the trainer's
size filter, judged on the full, un-split matrix as the trainer converts before tp) runs its
forward GEMM and the two backward GEMMs at the GPU's FP8 rate (`fp8_tflops` of the hardware
table, at the same `gemm_efficiency` as bf16), on 1-byte operands with a high-precision output,
and pays for its casts: each operand is read once for its amax and once more to write its
1-byte copy (dynamic scaling, per GEMM call). Row-wise scaling multiplies the FP8 GEMM time by
the calibration's `float8_rowwise_slowdown`. The embedding and head stay high precision.

FSDP's float8 all-gather (tensorwise, NCCL, dp_shard > 1: parallel.float8.float8_all_gather)
moves the converted weights as 1 byte instead of 2, plus one fp32 amax all-reduce per weight
after each optimizer step. Activation memory is unchanged: Float8Linear saves its
high-precision input for backward.
"""

from __future__ import annotations

from triaxis.errors import UserError
from triaxis.parallel.float8_filter import eligible_dims
from triaxis.plan.hardware import Hardware
from triaxis.plan.lora import block_linears
from triaxis.plan.problem import ModelShape

RECIPES = ("tensorwise", "rowwise")
CHOICES = ("off", *RECIPES, "auto")


def check_float8(hw: Hardware, recipe: str) -> None:
    """Refuse FP8 on a GPU without FP8 matrix units (one line)."""
    if recipe not in CHOICES:
        raise UserError(f"--float8 {recipe!r} is not one of {', '.join(CHOICES)}; pick one")
    if recipe in RECIPES and hw.gpu.fp8_flops <= 0:
        raise UserError(
            f"--float8 {recipe}: {hw.gpu.name} has no FP8 matrix units (no fp8_tflops in its "
            "hardware profile); plan for an H100/H200 (--gpu h100) or pass --float8 off"
        )


def converted(shape: ModelShape, min_dim: int) -> list[tuple[str, int, int]]:
    """(name in a block, in, out) of the block linears the trainer would convert."""
    return [(n, i, o) for n, i, o, _ in block_linears(shape) if eligible_dims(i, o, min_dim)]


def converted_block_params(shape: ModelShape, min_dim: int) -> int:
    """Weight elements of one block that the conversion covers (bias-free linears)."""
    return sum(i * o for _, i, o in converted(shape, min_dim))


def fp8_gemm_s(hw: Hardware, m: float, n: float, k: float, elem: int, recipe: str) -> float:
    """(m x k) @ (k x n) with both operands cast to float8 and an `elem`-byte output."""
    g = hw.gpu
    slow = hw.calib.float8_rowwise_slowdown if recipe == "rowwise" else 1.0
    compute = 2 * m * n * k / (g.fp8_flops * g.gemm_efficiency) * slow
    operands = m * k + k * n
    traffic = operands * 1 + m * n * elem
    casts = operands * (2 * elem + 1)
    return compute + (traffic + casts) / g.hbm_bytes_per_s


def uses_fp8_all_gather(recipe: str, hw: Hardware, fsdp: bool, dp_shard: int) -> bool:
    """The planner's copy of parallel.float8.float8_all_gather: a GPU profile runs NCCL."""
    return recipe == "tensorwise" and hw.gpu.fp8_flops > 0 and fsdp and dp_shard > 1
