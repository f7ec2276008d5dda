"""MoE blocks under tensor (+ sequence) parallelism: replicated on the tp group.

Between blocks the activations are sequence-sharded (Shard(1) on `tp`). An MoE block's input
is all-gathered on the sequence, as the dense MLP's is; every tp rank then routes and computes
the whole micro-batch with the full router, experts and shared experts, and keeps its own
sequence slice of the output (a local slice: no communication). Backward: the output gradient
is all-gathered, every tp rank computes the same, complete gradients, and the input's gradient
is sliced back (nothing to reduce). The parameters are Replicate DTensors on `tp`, as the
sequence-parallel norms' are, so the optimizer, FSDP (which adds the dp axes) and DCP see one
kind of parameter per block; the MoE code itself computes on their local tensors.

Why not shard the experts over tp (Megatron's and torchtitan's expert-TP): replicated, the
routing, the capacity's drops, the aux loss and the balancing counts are those of one process
on the same tokens, with no partial-sum bookkeeping between a replicated router and sharded
experts. The price is the expert compute (and, without ep, the expert memory) repeated tp times.
The axis that splits the experts is `parallel.ep`: its ranks lie inside dp_shard, so every
all-to-all stays within one tp coordinate and each tp rank of an ep group sends the same rows.
"""

from __future__ import annotations

import torch
from torch import nn

from triaxis.model.moe import MoE


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    # isinstance, not hasattr: torch.compile answers hasattr(param, "to_local") with False.
    return p.to_local() if isinstance(p, DTensor) else p


def replicate_moe(moe: MoE, tp_mesh) -> None:
    """Make every parameter of `moe` a Replicate DTensor on `tp_mesh` (on the meta device too,
    before materialize and init_weights) and let the MoE code compute on local tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    for module in moe.modules():
        if isinstance(module, nn.Linear):
            # The router's gate and the shared experts' linears compute as
            # replicated DTensors between a local input and a local output.
            distribute_module(module, tp_mesh, input_fn=_replicate_input, output_fn=_local_output)
    experts = moe.experts
    for name, p in list(experts.named_parameters(recurse=False)):
        d = DTensor.from_local(p.data, tp_mesh, [Replicate()], run_check=False)
        setattr(experts, name, nn.Parameter(d, requires_grad=p.requires_grad))
    # to_local keeps autograd: each gradient comes back as a Replicate DTensor, complete.
    experts.weights = lambda: (_local(experts.w1), _local(experts.w3), _local(experts.w2))


def _replicate_input(module, inputs, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)


def _local_output(module, output, mesh):
    return output.to_local()


def moe_tp_plan() -> dict:
    """The block's tp plan for its MoE feed-forward (see the module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput

    return {
        "feed_forward": PrepareModuleInputOutput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Replicate(),),
            desired_output_layouts=(Shard(1),),
            use_local_output=True,
        )
    }
