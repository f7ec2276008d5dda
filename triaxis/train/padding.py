"""Padding in packed data, counted on the device so that throughput counts real tokens.

A split packed by `prepare --pack-seq-len` (data/packing.py) fills each window's tail with
end-of-document tokens whose loss mask is 0. A window's padding is the trailing run of
positions whose input is that token and whose target is masked: the positions after its last
example's final token (that token's own position, which predicts only padding, is in the run).
Counted per micro-batch without a host read; the logged record reads the sum once.
"""

from __future__ import annotations

import torch

from triaxis.model.loss import IGNORE_INDEX


def padding_positions(inputs: torch.Tensor, targets: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions of (B, T) `inputs`/`targets` in their rows' trailing padding, as a 0-dim int64
    tensor on their device."""
    pad = (inputs == eos_id) & (targets == IGNORE_INDEX)
    # 1 while the run from the end of the row is unbroken, 0 from the first real position on.
    return pad.flip(-1).to(torch.int64).cumprod(-1).sum()
