"""Validation: the mean loss over the first val_batches global batches of each validation set,
in order, so every layout computes the same samples and the same value."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from triaxis.data.mixture import val_record
from triaxis.parallel.context import cp_rows
from triaxis.parallel.pipeline import local_value

if TYPE_CHECKING:  # the loop imports this module, not the reverse
    from triaxis.train.loop import Trainer


def validate_all(t: Trainer) -> dict[str, float]:
    """Validation metrics: val_loss, and per source of a mixture val_loss/NAME (val_loss
    is then their mean weighted by the mixture: data/mixture.py)."""
    return val_record({k: validate(t, ds) for k, ds in t.val_sets.items()}, t.train_ds)


@torch.no_grad()
def validate(t: Trainer, val_ds) -> float | None:
    """Mean loss over the first val_batches x global_batch samples of `val_ds`, in order;
    the same samples and value for every layout."""
    if t.cfg.train.val_batches == 0:
        return None
    t.faults.inject_fault("validation", t.env.rank)
    t.model.eval()
    total = torch.zeros((), device=t.device)
    for v in range(t.cfg.train.val_batches):
        cursor = v * t.cfg.train.global_batch
        batches = [t.local_batch(val_ds, cursor, m, shuffle=False) for m in range(t.grad_accum)]
        t.loss_scale = t._masked_scale(batches)
        if t.loss_scale is not None:  # the mean of each global batch, then of those
            t.loss_scale = t.loss_scale / t.cfg.train.val_batches
        with t.loss_parallel(), t.autocast():
            if t.pipeline is not None:
                inputs, targets = (torch.cat(parts) for parts in zip(*batches))
                total += t.pipeline.eval(*cp_rows(t.model, inputs, targets, t.doc_ids(inputs)))
                continue
            for inputs, targets in batches:
                total += local_value(t.loss_of(inputs, targets))
    t.model.train()
    n = t.cfg.train.val_batches * (1 if t.pipeline is not None else t.grad_accum)
    if t.loss_scale is not None:
        n = 1  # already a mean: the scale divided by the valid targets
    t.loss_scale = None
    return t.mean_over_dp(total / n)
