"""The one place that picks the attention kernel of a context-parallel block.

Ring attention (triaxis.parallel.ring_attention) computes attention one (query block, key block)
pair at a time and merges the partial results by log-sum-exp, so it needs a kernel that returns
the log-sum-exp of each query row beside the output, and a backward that takes the *merged*
output and log-sum-exp (the flash-attention backward: P = exp(S - lse), dS = P * (dP - rowsum(dO *
O))), which then gives each block's exact share of the gradient.

  cpu  -- aten._scaled_dot_product_flash_attention_for_cpu and its backward: the kernel CPU
          scaled_dot_product_attention itself runs, with an explicit additive mask per block.
          Never materializes the scores.
  math -- plain matmuls and logsumexp on any other device (CUDA included), the scores of one
          block at a time materialized and recomputed in backward (nothing saved per block).
          The fused CUDA kernels (flash / memory-efficient with log-sum-exp outputs) belong
          here too; they are not wired yet because no GPU was available to prove them.

Masks arrive as bool tensors (True = attend), one per block, or None with `causal` (the
diagonal block of plain causal attention) or without it (every key visible); the kernels take
them as additive float masks built per call. Rows with no visible key in a block get
lse = -inf and a zero output, which the merge then weighs by zero.
"""

from __future__ import annotations

import torch


def kernel_name(device: torch.device | str) -> str:
    return "cpu" if torch.device(device).type == "cpu" else "math"


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool, empty_rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, D), k/v (B, H, Lk, D), mask (B, 1, Lq, Lk) bool or None; causal: the
    diagonal block; empty_rows: (B, 1, Lq) bool of rows with no visible key, or None.
    Returns out (B, H, Lq, D), lse (B, H, Lq) fp32."""
    bias = _bias(mask, q)
    if kernel_name(q.device) == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias
        )
        lse = lse.float()
    else:
        scores = _scores(q, k, _causal_bias(bias, causal, q, k))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
        out = (probs @ v.float()).to(q.dtype)
    if empty_rows is not None:
        # The CPU kernel reports lse = 0 for a row with no visible key: mark it empty instead.
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
    bias = _bias(mask, q)
    if kernel_name(q.device) == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(torch.float32), 0.0, causal, attn_mask=bias
        )
        return dq, dk, dv
    scale = q.shape[-1] ** -0.5
    probs = torch.exp(
        _scores(q, k, _causal_bias(bias, causal, q, k)) - lse[..., None]
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
