"""The one place that knows which PyTorch is installed (supported: 2.11 to 2.14).

Code that needs an API newer than the oldest supported torch calls it through here, and any
test of the torch version lives here too, so that dropping an old release is one edit.

    all-gather / reduce-scatter into one flat tensor: `dist.all_gather_single` /
    `dist.reduce_scatter_single` (2.13 and 2.14; the older names are deprecated there), else
    `dist.all_gather_into_tensor` / `dist.reduce_scatter_tensor` (2.11). FSDP2 of the
    same torch calls the same one, so a test that counts FSDP's collectives patches the name
    `all_gather_name()` / `reduce_scatter_name()` gives.
    pipeline stages: `pipeline_stage`, a PipelineStage whose 2.11 warm-up sends to no rank
    itself.

What 2.11 does differently but can be written for every release alike (clipping, activation
offload) is fixed where it happens: docs/torch-versions.md lists it all.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

TORCH_VERSION: tuple[int, int] = tuple(int(x) for x in torch.__version__.split(".")[:2])
"""(major, minor) of the installed torch."""


REUSABLE_STAGER: bool = TORCH_VERSION >= (2, 13)
"""Whether DCP's DefaultStager can stage a state dict into reused host buffers. In 2.11 it
cannot deep-copy a dict (its copy table lacks `type`: KeyError) and its buffer cache, keyed by
short-lived storage objects, never hits; 2.12 was not tested, so it is left out too."""


def _newest(*names: str) -> str:
    return next(n for n in names if hasattr(dist, n))


def all_gather_name() -> str:
    """The name in torch.distributed of the flat all-gather this torch (and its FSDP2) calls."""
    return _newest("all_gather_single", "all_gather_into_tensor")


def reduce_scatter_name() -> str:
    """The name in torch.distributed of the flat reduce-scatter this torch (and its FSDP2)
    calls."""
    return _newest("reduce_scatter_single", "reduce_scatter_tensor")


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None, async_op=False):
    """Every rank's `input`, concatenated into `output` in rank order."""
    # Looked up per call: a test's patch of torch.distributed sees these calls too.
    return getattr(dist, all_gather_name())(output, input, group=group, async_op=async_op)


def reduce_scatter_single(
    output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM, group=None, async_op=False
):
    """`input` reduced across ranks by `op`; this rank's chunk of the result into `output`."""
    return getattr(dist, reduce_scatter_name())(
        output, input, op=op, group=group, async_op=async_op
    )


def pipeline_stage(*args, **kwargs):
    """torch.distributed.pipelining.PipelineStage, minus one 2.11 wart: its first step
    exchanges a dummy tensor with every neighbouring stage to open the connections, also with a
    neighbour on the same rank (a V schedule's turn: stages pp-1 and pp), and gloo cannot send
    to itself. Those exchanges are dropped (a rank hands its own stages activations in memory).
    2.13 and 2.14 warm PipelineStages up another way and never call the overridden method."""
    from torch.distributed.pipelining import PipelineStage

    return _stage_class(PipelineStage)(*args, **kwargs)


@functools.cache
def _stage_class(base):
    class Stage(base):
        def _get_init_p2p_neighbors_ops(self):
            ops = super()._get_init_p2p_neighbors_ops()
            return [op for op in ops if op.group_peer != self.group_rank]

    return Stage
