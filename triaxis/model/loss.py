"""Next-token cross-entropy fused with the LM head, a chunk of tokens at a time.

The plain head materializes the logits of every token of the micro-batch: for the `1b` preset at
8 x 2048 tokens that is 16k x 128k = 2.1G values, 4.2 GB in bf16, 8.4 GB again as the fp32 copy
the loss takes, and as much for its gradient. Here each chunk of `chunk` tokens goes through the
head, its loss and the gradient of that loss with respect to the chunk's logits (softmax minus
one-hot) at once, in forward; the chunk's contributions to the input gradient and the weight
gradient are kept and its logits freed. Backward only scales those two gradients. Peak memory of
the loss falls from ~3 x tokens x vocab values to ~3 x chunk x vocab; the FLOPs are the plain
head's (no recomputation).

Numerics follow autocast: the matrix products run in the autocast dtype (bf16 on a GPU), the
softmax and the loss in fp32; the weight gradient accumulates over chunks in the weight's dtype
(fp32 master weights under autocast, bf16 working copies under FSDP mixed precision, where the
sum of a few chunk products rounds a few times where the plain head's one product rounds once).
Single-device code: tensor-parallel (vocabulary-sharded) heads and pipeline stages keep the plain
head and loss (triaxis.train.loop decides).

A target of IGNORE_INDEX (-100, torch's cross_entropy default) is skipped as cross_entropy skips
it: no loss, no gradient, and the mean is over the other targets (0, not NaN, when none is
left). Loss-masked fine-tuning data (prompt tokens) arrives that way.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Mean cross-entropy of `targets` (N,) under logits h @ weight.T, h (N, d), weight (V, d),
    over the targets that are not IGNORE_INDEX, computed `chunk` rows at a time;
    differentiable in h and weight."""
    dtype = h.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedHeadLoss.apply(h, weight, targets, chunk, dtype)
    with torch.autocast(h.device.type, enabled=False):
        total = sum(
            _chunk_loss(h[s : s + chunk], weight, targets[s : s + chunk], dtype, None)[0]
            for s in range(0, h.shape[0], chunk)
        )
    return total / _count(targets)


def _count(targets: torch.Tensor) -> torch.Tensor:
    """Targets the loss counts, at least 1: a tensor, so no host sync."""
    return (targets != IGNORE_INDEX).sum().clamp_(min=1)


def _chunk_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype,
    grad_scale: torch.Tensor | None,
):
    """(summed loss of the chunk in fp32, d(loss x grad_scale)/d(logits) in `dtype` or None)."""
    logits = (h.to(dtype) @ weight.to(dtype).T).float()
    lse = torch.logsumexp(logits, dim=-1)
    rows = torch.arange(targets.shape[0], device=targets.device)
    keep = targets != IGNORE_INDEX
    safe = torch.where(keep, targets, 0)  # any real row: its loss is multiplied by 0
    loss = torch.where(keep, lse - logits[rows, safe], 0.0).sum()
    if grad_scale is None:
        return loss, None
    # softmax - onehot, in place on the fp32 logits: the chunk holds one vocab-wide fp32 buffer.
    grad = logits.sub_(lse[:, None]).exp_()
    grad[rows, safe] -= 1.0
    grad.mul_(torch.where(keep, grad_scale, 0.0)[:, None])  # ignored rows: no gradient
    return loss, grad.to(dtype)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype):
        n = _count(targets)
        grad_h = torch.empty_like(h)
        # In the weight's own dtype: the buffer is the head's gradient the plain path would
        # allocate in backward (bf16 under FSDP mixed precision, fp32 under autocast), not an
        # extra fp32 copy of a vocab x dim matrix.
        grad_w = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, h.shape[0], chunk):
                hc, tc = h[s : s + chunk], targets[s : s + chunk]
                loss, g = _chunk_loss(hc, w, tc, dtype, 1.0 / n)
                total += loss
                grad_h[s : s + chunk] = (g @ w).to(h.dtype)
                grad_w += (g.T @ hc.to(dtype)).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None
