"""The one place that picks the attention kernel of a context-parallel block.

Ring attention (triaxis.parallel.ring_attention) computes attention one (query block, key block)
pair at a time and merges the partial results by log-sum-exp, so it needs a kernel that returns
the log-sum-exp of each query row beside the output, and a backward that takes the *merged*
output and log-sum-exp (the flash-attention backward: P = exp(S - lse), dS = P * (dP - rowsum(dO *
O))), which then gives each block's exact share of the gradient.

`select_kernel` decides, per block, from (device type, dtype, mask kind, head_dim):

  cpu       -- aten._scaled_dot_product_flash_attention_for_cpu and its backward: the kernel CPU
               scaled_dot_product_attention itself runs, with an explicit additive mask per block.
  flash     -- CUDA, a block with no mask (every key visible) or the causal diagonal, fp16/bf16,
               head_dim a multiple of 8 up to 256, sm80+ (triaxis.parallel.cp_kernel_cuda).
  efficient -- CUDA, a block with a document mask (additive bias), or what flash refuses (fp32):
               the memory-efficient kernel, fp16/bf16/fp32, head_dim a multiple of 8 (4 in fp32).
  math      -- what neither fused kernel takes, and every other device: plain matmuls and
               logsumexp, the scores of one block materialized, recomputed in backward. On CUDA
               it warns once with the reason (it holds a block's scores: memory).

None of the fused kernels ever materializes the scores. Masks arrive as bool tensors (True =
attend), one per block, or None with `causal` (the diagonal block of plain causal attention) or
without it (every key visible); the kernels take them as additive float masks built per call.
Rows with no visible key in a block get lse = -inf and a zero output, which the merge then
weighs by zero.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from triaxis.parallel import cp_kernel_cuda

HALF = (torch.float16, torch.bfloat16)
MASK_KINDS = ("none", "causal", "bias")


class KernelChoice(NamedTuple):
    name: str  # cpu | flash | efficient | math
    reason: str


def kernel_name(device: torch.device | str) -> str:
    """The kernel family of `device`: "cpu", "cuda" (a fused kernel chosen per block by
    `select_kernel`) or "math" (any other device)."""
    kind = torch.device(device).type
    return kind if kind in ("cpu", "cuda") else "math"


@functools.cache
def select_kernel(
    device_type: str, dtype: torch.dtype, mask_kind: str, head_dim: int, sm: int | None = None
) -> KernelChoice:
    """The kernel of one block. mask_kind: "none" (every key visible), "causal" (the diagonal
    block of plain causal attention) or "bias" (a document mask); sm: the CUDA compute
    capability as 10 * major + minor, None when not known (taken as able)."""
    assert mask_kind in MASK_KINDS, mask_kind
    if device_type == "cpu":
        return KernelChoice("cpu", "CPU: the kernel of CPU scaled_dot_product_attention")
    if device_type != "cuda":
        return KernelChoice("math", f"{device_type}: no fused kernel with a log-sum-exp output")
    no_flash = _flash_refuses(dtype, mask_kind, head_dim, sm)
    if no_flash is None:
        return KernelChoice("flash", f"CUDA, {dtype}, {mask_kind} mask, head_dim {head_dim}")
    no_efficient = _efficient_refuses(dtype, head_dim, sm)
    if no_efficient is None:
        return KernelChoice("efficient", f"flash refuses {no_flash}")
    return KernelChoice("math", f"flash refuses {no_flash}; efficient refuses {no_efficient}")


def _flash_refuses(dtype, mask_kind: str, head_dim: int, sm: int | None) -> str | None:
    if mask_kind == "bias":
        return "a document mask (it takes no bias)"
    if dtype not in HALF:
        return f"{dtype} (it needs float16 or bfloat16)"
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim} (it needs a multiple of 8 up to 256)"
    if sm is not None and sm < 80:
        return f"sm{sm} (it needs sm80 or newer)"
    return None


def _efficient_refuses(dtype, head_dim: int, sm: int | None) -> str | None:
    if dtype not in (*HALF, torch.float32):
        return f"{dtype} (it takes float16, bfloat16 or float32)"
    if dtype == torch.bfloat16 and sm is not None and sm < 80:
        return f"bfloat16 on sm{sm} (it needs sm80 or newer)"
    align = 8 if dtype in HALF else 4  # 128-bit rows for the tensor-core matmuls
    if head_dim % align:
        return f"head_dim {head_dim} (it needs a multiple of {align} in {dtype})"
    return None


@functools.cache
def _sm(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def choose(q: torch.Tensor, mask, causal: bool) -> KernelChoice:
    """The kernel of the block whose queries are `q` (B, H, Lq, D)."""
    family = kernel_name(q.device)
    kind = "bias" if mask is not None else "causal" if causal else "none"
    sm = _sm(q.device) if q.device.type == "cuda" else None
    choice = select_kernel(family, q.dtype, kind, q.shape[-1], sm)
    if choice.name == "math" and family == "cuda":
        warnings.warn(f"ring attention runs the math kernel on CUDA: {choice.reason}", stacklevel=3)
    return choice


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool, empty_rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, D), k/v (B, H, Lk, D), mask (B, 1, Lq, Lk) bool or None; causal: the
    diagonal block; empty_rows: (B, 1, Lq) bool of rows with no visible key, or None.
    Returns out (B, H, Lq, D), lse (B, H, Lq) fp32."""
    name = choose(q, mask, causal).name
    if name == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_bias(mask, q)
        )
        lse = lse.float()
    elif name == "flash":
        out, lse = cp_kernel_cuda.flash_forward(q, k, v, causal)
    elif name == "efficient":
        out, lse = cp_kernel_cuda.efficient_forward(q, k, v, mask, causal)
    else:
        scores = _scores(q, k, _causal_bias(_bias(mask, q), causal, q, k))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
        out = (probs @ v.float()).to(q.dtype)
    if empty_rows is not None:
        # The kernels report lse = 0 (CPU) or leave a row with no visible key undefined: mark
        # it empty instead.
        lse = lse.masked_fill(empty_rows, float("-inf"))
        out = out.masked_fill(empty_rows[..., None], 0.0)
    return out, lse


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of (dq, dk, dv), given the merged `out` and `lse` of the query rows."""
    name = choose(q, mask, causal).name
    if name == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(torch.float32), 0.0, causal, attn_mask=_bias(mask, q)
        )
        return dq, dk, dv
    if name == "flash":
        return cp_kernel_cuda.flash_backward(dout, q, k, v, out, lse.float(), causal)
    if name == "efficient":
        return cp_kernel_cuda.efficient_backward(dout, q, k, v, out, lse, mask, causal)
    scale = q.shape[-1] ** -0.5
    probs = torch.exp(
        _scores(q, k, _causal_bias(_bias(mask, q), causal, q, k)) - lse[..., None]
    )  # (B, H, Lq, Lk)
    dout32 = dout.float()
    dprobs = dout32 @ v.float().transpose(-1, -2)
    delta = (dout32 * out.float()).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dq = (dscores @ k.float()) * scale
    dk = (dscores.transpose(-1, -2) @ q.float()) * scale
    dv = probs.transpose(-1, -2) @ dout32
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores if bias is None else scores + bias.float()


def _bias(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """bool mask -> additive mask in q's dtype (the CPU kernel wants q's dtype)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -torch.inf)


def _causal_bias(bias, causal: bool, q: torch.Tensor, k: torch.Tensor):
    if not causal:
        return bias
    tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    return _bias(tril, q)
