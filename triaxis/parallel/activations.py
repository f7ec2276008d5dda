"""What the blocks keep for backward: activation checkpointing and offloading its inputs.

Three ways to checkpoint a block (parallel.activation_checkpoint, parallel.ac_selective):

  full             every block keeps only its input and recomputes its forward in backward;
  selective/block  every ac_every-th block does that, the others keep everything;
  selective/op     every block keeps its matmul and attention-kernel outputs (and, under TP,
                   its reduce-scattered outputs) and recomputes only the cheap ops between
                   them: norms, rotary, SiLU and the gating product (torchtitan's "selective":
                   the GEMMs and the attention core are not run again, the cheap ops are).

parallel.activation_offload moves the one tensor a checkpointed block keeps -- its input -- to
host memory during forward and brings it back for the recompute: the planner's
`offload_checkpoints` (triaxis.plan.memory). Non-reentrant checkpointing saves the block input
through autograd's saved-tensor mechanism *before* it enters its own recompute hooks
(torch.utils.checkpoint `save_inputs`), so an outer `saved_tensors_hooks` around the checkpoint
call sees exactly that input and nothing from inside the block.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import nn


def op_save_list() -> set:
    """The ops whose outputs op-level selective checkpointing keeps: every matmul, the fused
    attention kernels (on a GPU the costliest op to run again; torchtitan's list too) and the
    TP reduce-scatter after wo / w2 (recomputing it would repeat a collective). Everything else
    is recomputed."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default}
    # Every SDPA backend's op (CUDA flash / mem-efficient / cuDNN, the CPU flash kernel, the
    # out-of-tree one) and FlexAttention's higher-order op; MATH decomposes into plain ops.
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    ):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    flex = getattr(torch._higher_order_ops, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    functional = getattr(torch.ops, "_c10d_functional", None)
    if functional is not None and hasattr(functional, "reduce_scatter_tensor"):
        ops.add(functional.reduce_scatter_tensor.default)
    return ops


def _op_policy(save: set, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def op_sac_context():
    """context_fn for torch.utils.checkpoint: the op-level selective policy, fresh per call
    (the caching modes hold one forward's saved outputs)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(partial(_op_policy, op_save_list()))


class _Saved:
    """One offloaded tensor: its host copy, and its GPU copy once fetched back."""

    __slots__ = ("device", "host", "gpu", "prev", "__weakref__")

    def __init__(self, device: torch.device, host: torch.Tensor, prev):
        self.device, self.host, self.gpu, self.prev = device, host, None, prev


class ActivationOffload:
    """saved_tensors_hooks that keep saved tensors in host memory.

    On CUDA: a pinned buffer, filled on a side stream once the compute stream has produced the
    tensor (the GPU tensor is kept from reuse until the copy ends: record_stream); in backward
    the tensor comes back on the side stream, and fetching one also starts fetching the one
    saved before it -- the block whose backward comes next -- so that copy hides behind this
    block's recompute and backward. On CPU the same path copies into a separate host tensor.
    Counts what it moved (tests and logs read `num_offloaded` / `bytes_offloaded`).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.num_offloaded = 0
        self.bytes_offloaded = 0
        self._last = None  # weakref to the most recently packed _Saved

    def new_pass(self, *_) -> None:
        """A new forward pass (micro-batch) starts: its first block prefetches nothing, so a
        pipeline's interleaved micro-batches never pull another one's input in early."""
        self._last = None

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        # Only activations move: the rope table and masks every block shares (no grad) stay.
        # So does an empty tensor: torch 2.11's checkpoint saves a requires-grad dummy of 0
        # elements beside the block input (_NoopSaveInputs; 2.13 and 2.14 save the input alone).
        if not t.requires_grad or t.numel() == 0:
            return t
        if hasattr(t, "trigger_wait"):
            # An AsyncCollectiveTensor (under TP, the embedding's reduce-scattered output, the
            # first block's input): the collective's result as a plain tensor.
            t = t.trigger_wait()
        if type(t) is not torch.Tensor:
            return t  # other subclasses (a DTensor) stay where they are
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda and t.is_cuda)
        if self.cuda and t.is_cuda:
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
        else:
            host.copy_(t)
        self.num_offloaded += 1
        self.bytes_offloaded += t.numel() * t.element_size()
        saved = _Saved(t.device, host, self._last)
        self._last = weakref.ref(saved)
        return saved

    def _fetch(self, saved: _Saved) -> None:
        if saved.gpu is not None:
            return
        if self.cuda and saved.device.type == "cuda":
            with torch.cuda.stream(self.stream):
                saved.gpu = saved.host.to(saved.device, non_blocking=True)
        else:
            saved.gpu = saved.host.to(saved.device, copy=True)

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        self._fetch(saved)
        prev = saved.prev() if saved.prev is not None else None
        if prev is not None:
            self._fetch(prev)  # prefetch the next block's input of this backward
        out, saved.gpu = saved.gpu, None
        if self.cuda and out.is_cuda:
            compute = torch.cuda.current_stream(out.device)
            compute.wait_stream(self.stream)
            out.record_stream(compute)
        return out


def _checkpoint(offload: ActivationOffload | None, function, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    if offload is None:
        return checkpoint(function, *args, **kwargs)
    with offload.hooks():
        return checkpoint(function, *args, **kwargs)


def checkpointed_blocks(num_blocks: int, mode: str, selective: str, every: int) -> list[int]:
    """Indices of the blocks wrapped in a checkpoint."""
    if mode == "full" or (mode == "selective" and selective == "op"):
        return list(range(num_blocks))
    if mode == "selective":
        return [i for i in range(num_blocks) if i % every == every - 1]
    return []


def apply_ac(
    model: nn.Module,
    mode: str,
    every: int,
    selective: str = "block",
    offload: bool = False,
    device: torch.device | None = None,
) -> ActivationOffload | None:
    """Wrap the checkpointed blocks of `model.layers`; returns the offload hooks' owner (None
    without offload). Blocks are indexed within this model (a pipeline stage counts its own)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs: dict = {"use_reentrant": False, "preserve_rng_state": False}
    if mode == "selective" and selective == "op":
        kwargs["context_fn"] = op_sac_context
    hooks = ActivationOffload(device or torch.device("cpu")) if offload else None
    kwargs["checkpoint_fn"] = partial(_checkpoint, hooks)
    if hooks is not None:
        model.register_forward_pre_hook(hooks.new_pass)
    names = list(model.layers.keys())
    for i in checkpointed_blocks(len(names), mode, selective, every):
        # checkpoint_wrapper (unlike torch.utils.checkpoint inline) keeps state-dict keys
        # clean for DCP; non-reentrant so it composes with FSDP2 and DTensor.
        block = model.layers.get_submodule(names[i])
        model.layers.register_module(names[i], checkpoint_wrapper(block, **kwargs))
    return hooks
