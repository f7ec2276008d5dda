"""The fused CUDA kernels of one ring-attention block (chosen by triaxis.parallel.cp_kernel).

Both are the kernels CUDA scaled_dot_product_attention runs, called through their aten ops so
that the forward returns the log-sum-exp the ring merges by, and the backward takes the *merged*
output and log-sum-exp (schemas identical in torch 2.11 and 2.13):

  flash     -- aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, ...) and
               its backward; fp16/bf16, no mask (a fully visible block, or is_causal on the
               diagonal). lse (B, H, Lq) fp32.
  efficient -- aten._scaled_dot_product_efficient_attention(q, k, v, attn_bias,
               compute_log_sumexp, dropout_p, is_causal) and its backward; fp16/bf16/fp32, an
               additive bias (a document mask). Its lse comes back padded along the query dim to
               a multiple of 32 (filled with +inf; not on ROCm): sliced here, and padded the same
               way again for the backward, which reads it in 32-row tiles.

Dropout is 0, so the random-state tensors the backward takes are never read; they are passed as
the forward would return them at dropout 0 (flash: a (2,) and a () uint64 tensor; efficient: two
() int64 tensors on the host). cum_seq_q/cum_seq_k are undefined (None) for dense batches.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

LSE_ALIGN = 1 if torch.version.hip else 32
"""The efficient kernel's lse rows: padded to this multiple (its kAlignLSE; compact on ROCm)."""
BIAS_ALIGN = 16
"""The efficient kernel reads the bias in rows aligned to 16 elements: SDPA pads it the same way."""


def flash_forward(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> out (B, H, Lq, D), lse (B, H, Lq) fp32."""
    out, lse, *_ = aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, causal)
    return out, lse


def flash_backward(dout, q, k, v, out, lse, causal: bool):
    """(dq, dk, dv) of one block from the merged `out` and `lse` (B, H, Lq) fp32."""
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward.default(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset
    )  # None, None: cum_seq_q/k (dense batch); max_q, max_k: the block's lengths
    return dq, dk, dv


def efficient_forward(q, k, v, mask, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, 1, Lq, Lk) bool (True = attend) or None -> out (B, H, Lq, D), lse (B, H, Lq)."""
    bias = efficient_bias(mask, q)
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention.default(
        q, k, v, bias, True, 0.0, causal
    )
    return out, lse[..., : q.shape[2]]  # drop the padding rows (LSE_ALIGN)


def efficient_backward(dout, q, k, v, out, lse, mask, causal: bool):
    """(dq, dk, dv) of one block from the merged `out` and `lse`; no gradient for the bias."""
    bias = efficient_bias(mask, q)
    padded = _pad_lse(lse.float())
    seed = torch.empty((), dtype=torch.long)
    offset = torch.empty((), dtype=torch.long)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward.default(
        dout, q, k, v, bias, out, padded, seed, offset, 0.0, [True, True, True, False], causal
    )
    return dq, dk, dv


def efficient_bias(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, Lq, Lk) bool -> (B, H, Lq, Lk) additive bias in q's dtype (the kernel's rule),
    its rows BIAS_ALIGN-aligned in memory and broadcast over heads (stride 0, no copy)."""
    if mask is None:
        return None
    B, _, Lq, Lk = mask.shape
    storage = torch.zeros(B, 1, Lq, Lk + (-Lk % BIAS_ALIGN), dtype=q.dtype, device=q.device)
    bias = storage[..., :Lk].masked_fill_(~mask, -torch.inf)
    return bias.expand(B, q.shape[1], Lq, Lk)


def _pad_lse(lse: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq) -> (B, H, ceil(Lq / LSE_ALIGN) * LSE_ALIGN), +inf in the padding rows: the
    layout the efficient forward returns and its backward reads."""
    pad = -lse.shape[-1] % LSE_ALIGN
    if pad == 0:
        return lse.contiguous()
    return torch.cat([lse, lse.new_full((*lse.shape[:-1], pad), torch.inf)], dim=-1)
