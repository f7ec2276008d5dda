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
        w = weight.to(dtype)
        total = sum(
            _chunk_loss(h[s : s + chunk].to(dtype), w, targets[s : s + chunk], dtype, False)[0]
            for s in range(0, h.shape[0], chunk)
        )
    return total / _count(targets)


def _count(targets: torch.Tensor) -> torch.Tensor:
    """Targets the loss counts, at least 1: a tensor, so no host sync."""
    return (targets != IGNORE_INDEX).sum().clamp_(min=1)


def _chunk_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, grad: bool
):
    """(summed loss of the chunk in fp32, softmax - onehot of the chunk's logits in `dtype`, or
    None without `grad`). `h` and `weight` already in `dtype`; rows of ignored targets hold
    a gradient the caller multiplies by 0.

    At the 1b shape a chunk's fp32 logits are 2 GB: every pass over them costs. So one fp32
    buffer and three passes: log-softmax in place (the loss is its value at the target, as in
    F.cross_entropy), exp written straight in `dtype`, and the two products that read it. The
    scale (1 for counted rows, 0 for ignored ones; the mean's 1 / count in backward) goes on
    the chunk x dim operands and results instead (_FusedHeadLoss)."""
    logits = (h @ weight.T).float()  # no copy when dtype is fp32
    logp = torch._log_softmax(logits, -1, False, out=logits)  # row-wise: in place is safe
    rows = torch.arange(targets.shape[0], device=targets.device)
    keep = targets != IGNORE_INDEX
    safe = torch.where(keep, targets, 0)  # any real row: its loss is multiplied by 0
    picked = logp[rows, safe]
    loss = torch.where(keep, -picked, 0.0).sum()
    if not grad:
        return loss, None
    out = logp if dtype == logp.dtype else torch.empty(logp.shape, dtype=dtype, device=h.device)
    softmax = torch.exp(logp, out=out)
    softmax[rows, safe] = (picked.exp() - 1.0).to(dtype)  # - onehot, in fp32 before rounding
    return loss, softmax


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
                hc, tc = h[s : s + chunk].to(dtype), targets[s : s + chunk]
                loss, g = _chunk_loss(hc, w, tc, dtype, True)
                total += loss
                keep = (tc != IGNORE_INDEX)[:, None]  # (chunk, 1); x 0 / 1 is exact
                # Straight into the outputs: no vocab x dim product or cast copy (add_ casts
                # a bf16 product into an fp32 grad_w as it adds).
                gh = grad_h[s : s + chunk]
                if grad_h.dtype == dtype:
                    torch.mm(g, w, out=gh)
                else:
                    gh.copy_(g @ w)
                gh.mul_(keep)
                if grad_w.dtype == dtype:
                    grad_w.addmm_(g.T, hc * keep)
                else:
                    grad_w.add_(g.T @ (hc * keep))
        ctx.save_for_backward(grad_h, grad_w, n)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_out / n  # the mean's 1 / count, and the caller's scale
        # In place: backward runs once (a second one fails autograd's version check, loudly).
        return grad_h.mul_(scale), grad_w.mul_(scale), None, None, None
