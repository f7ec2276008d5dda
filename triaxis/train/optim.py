"""AdamW with decoupled weight decay on matrices, and a warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from triaxis.config import TrainConfig
from triaxis.parallel.host import to_device


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, params_on_cpu: bool = False
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters; decay on matrices only. `device` and
    `params_on_cpu` no longer change the choice (fused kernels exist for CUDA and CPU
    parameters alike); kept for callers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused, on every device (CPU included): one kernel per group, the step counts stay on
    # the parameters' device (foreach reads them on the host every step), and it honours
    # `optimizer.found_inf`, the device-side flag that makes a step with non-finite gradients
    # a no-op (triaxis.train.numerics) without the host looking.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps (linear warm-up, then cosine)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def rewind_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Take back `steps` scheduler steps: updates the device skipped (non-finite gradients)
    that the host learns of only at the next log step. The learning rate is set from the
    rewound step at once, so the next update uses the schedule's own value."""
    scheduler.last_epoch -= steps
    lrs = [
        base * fn(scheduler.last_epoch)
        for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def clip_grad_norm(
    params: list[torch.Tensor], max_norm: float, pp_group=None, host_grads_to=None
) -> torch.Tensor:
    """Global gradient-norm clipping that works for plain tensors and DTensors alike; with
    pipeline stages the squared norms of all stages are summed first. `host_grads_to`: the
    device, when the gradients live on the host (FSDP's CPU offload)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    # Expert parallelism: the experts' gradients live on the expert mesh, the rest on the world
    # mesh (and, with tp, the MoE blocks' are plain tensors); each set's norm is reduced over
    # its own mesh, then they combine. DTensors of two meshes never meet in one op.
    meshes = {id(getattr(g, "device_mesh", None)): None for g in grads}
    sets = [[g for g in grads if id(getattr(g, "device_mesh", None)) == m] for m in meshes]
    if host_grads_to is None:
        norms = [torch.nn.utils.get_total_norm(s, norm_type=2.0) for s in sets]
    else:
        # Each host gradient's norm is taken where it is (no copy of the gradients); the norms
        # go to the device before anything reduces them across ranks, since the mesh groups
        # serve device tensors only (NCCL; triaxis.parallel.host). The host waits for the
        # device anyway here: the optimizer steps on the host.
        norms = [_host_norm(s, host_grads_to) for s in sets]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    if len(norms) == 1:
        norm = norms[0]
    else:  # none (a stage without trainable parameters) or several meshes
        norm = torch.nn.utils.get_total_norm(norms, norm_type=2.0)
    if pp_group is not None:
        sq = norm.pow(2)
        dist.all_reduce(sq, group=pp_group)
        norm = sq.sqrt()
    if max_norm > 0:
        # torch 2.11's foreach multiply leaves a Partial(sum) DTensor unchanged: the gradients of
        # TP's sequence-parallel norm weights would go unclipped. Those few are scaled one by one.
        partial = [p for p in params if _is_partial(p.grad)]
        rest = [p for p in params if not _is_partial(p.grad)]
        # One foreach per mesh: it cannot mix DTensors of two meshes (expert parallelism).
        for m in {id(getattr(p.grad, "device_mesh", None)) for p in rest}:
            same = [p for p in rest if id(getattr(p.grad, "device_mesh", None)) == m]
            torch.nn.utils.clip_grads_with_norm_(same, max_norm, norm)
        torch.nn.utils.clip_grads_with_norm_(partial, max_norm, norm, foreach=False)
    return norm


def _host_norm(grads: list[torch.Tensor], device) -> torch.Tensor:
    """The 2-norm of host gradients of one mesh, each gradient's norm taken where it is and
    moved to `device` before anything combines them across ranks."""
    norms = [to_device(torch.linalg.vector_norm(g, 2.0), device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def _is_partial(grad) -> bool:
    return any(p.is_partial() for p in getattr(grad, "placements", ()))
