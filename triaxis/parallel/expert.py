"""Expert parallelism (`parallel.ep`): each MoE block's experts sharded over an ep group carved out
of the data-parallel ranks, tokens dispatched to their experts' ranks and combined back with
all-to-all, as torchtitan and Megatron do.

The ep group is the innermost `ep` consecutive ranks of `dp_shard` (dims.build_expert_mesh):
dp_shard = edp x ep, row-major. The expert weights become DTensors sharded on dim 0 (the expert
dim) over `ep`, so a rank holds n_experts / ep whole experts, full-size checkpoints and
`init_weights`' seeded values keep working, and FSDP then shards those local experts over the
data-parallel ranks outside the group (`edp`, with `dp_replicate`: HSDP).

Gradients: an expert's owner receives the tokens of every rank of its group, so its gradient
is the sum over the ep ranks' losses; FSDP then averages over edp only. `_ScaleGrad` divides
it by ep on the way, which makes it the mean over all data-parallel ranks, as the dense
parameters' gradients are. The router stays replicated: routing is the single-process one.

Host values: the all-to-all split sizes are counted on the device, exchanged over the ep group
as device tensors (an all-to-all of the per-expert counts), and read once per block forward:
all_to_all_single takes its splits as host integers (a host sync under ep only).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from triaxis.model.moe import expert_swiglu, moe_layers


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows; backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` (see the module docstring)."""

    @staticmethod
    def forward(ctx, w, scale: float):
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _local(w: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    # isinstance, not hasattr: torch.compile answers hasattr(param, "to_local") with False.
    return w.to_local() if isinstance(w, DTensor) else w


def ep_dispatch_compute_combine(moe, group, ep: int, flat, chosen, weights, counts):
    """MoE.dispatch_compute_combine under expert parallelism: the same kept assignments (the
    capacity drops this rank's late ones before anything is sent, as one process would), their
    rows sent to the rank owning their expert, computed there, sent back, weighted and summed."""
    N, D = flat.shape
    n_local = moe.n_experts // ep
    expert = chosen.flatten()
    token = torch.arange(N, device=flat.device).repeat_interleave(moe.top_k)
    order = torch.argsort(expert, stable=True)  # grouped by expert: by owner rank too
    w = weights.flatten()[order].to(flat.dtype)
    capacity = moe.capacity(N)
    if capacity:
        starts = counts.cumsum(0) - counts
        rank = torch.arange(order.numel(), device=flat.device) - starts[expert[order]]
        keep = rank < capacity
        order, w = order[keep], w[keep]
        sent = counts.clamp(max=capacity)
        dropped = (~keep).sum()
    else:
        sent = counts
        dropped = torch.zeros((), dtype=torch.long, device=flat.device)
    # Per-expert counts, device to device: received[s, e] = rows rank s sends to local expert e.
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=group)
    received = received.view(ep, n_local)
    in_splits = sent.view(ep, n_local).sum(1).tolist()
    out_splits = received.sum(1).tolist()
    x = _AllToAll.apply(flat[token[order]], out_splits, in_splits, group)
    # Received rows come by source rank, then local expert: regroup them by local expert.
    local_expert = torch.arange(n_local, device=flat.device).repeat(ep)
    perm = torch.argsort(local_expert.repeat_interleave(received.flatten()), stable=True)
    ends = received.sum(0).cumsum(0).to(torch.int32)
    # Through the module's call: FSDP's hooks gather the edp shards of this rank's experts.
    y = moe.experts(x[perm], ends)
    y = torch.zeros_like(y).index_copy(0, perm, y)
    y = _AllToAll.apply(y, in_splits, out_splits, group) * w[:, None]
    return flat.new_zeros(N, D).index_add(0, token[order], y), dropped


def _local_experts_forward(experts, ep: int, x, ends):
    """Experts.forward on this rank's experts (the local tensors of the ep-sharded weights)."""
    w = (_ScaleGrad.apply(_local(p), 1.0 / ep) for p in (experts.w1, experts.w3, experts.w2))
    return expert_swiglu(x, ends, *w)


def apply_ep(model: nn.Module, ep_mesh) -> None:
    """Shard every MoE block's experts over `ep_mesh` (dim 0) and route its tokens through
    all-to-all over that group. On the meta device, before materialize and init_weights."""
    from torch.distributed.tensor import DTensor, Shard

    ep = ep_mesh.size()
    group = ep_mesh.get_group()
    for _, moe in moe_layers(model):
        for name, p in list(moe.experts.named_parameters(recurse=False)):
            local = torch.empty((p.shape[0] // ep, *p.shape[1:]), dtype=p.dtype, device=p.device)
            d = DTensor.from_local(
                local, ep_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride()
            )
            setattr(moe.experts, name, nn.Parameter(d, requires_grad=p.requires_grad))
        moe.experts.forward = functools.partial(_local_experts_forward, moe.experts, ep)
        moe.dispatch_compute_combine = functools.partial(
            ep_dispatch_compute_combine, moe, group, ep
        )


def expert_fsdp_mesh(expert_mesh, dims):
    """The ranks that share the same experts (FSDP shards them there): edp, with replicas."""
    if dims.dp_replicate > 1:
        return expert_mesh["dp_replicate", "edp"]
    return expert_mesh["edp"]
