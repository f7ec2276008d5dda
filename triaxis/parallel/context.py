"""Context parallelism applied from outside: what the trainer and the model hand to the cp axis.

The trainer computes document ids on each whole row, then `shard` keeps this rank's head-tail
shard of inputs, targets and document ids (triaxis.parallel.cp_shard). The single-device model
asks its `context_parallel` attribute (set by `apply_cp`; None = no cp) for the RoPE rows of its
tokens' global positions and for the attention "mask": a RingPlan, which
triaxis.model.attention.attend hands q, k, v to (ring attention). The plan is built once per
forward and shared by every layer.

Each cp rank's loss is the mean over its own tokens; with equal token counts per rank (always:
head-tail chunks are equal) the mean of those means, which FSDP's gradient average over
dp_shard x cp and the trainer's loss average over dp x cp take, is the whole sequence's mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from triaxis.model.attention import document_positions
from triaxis.parallel.cp_shard import head_tail_positions, shard_head_tail
from triaxis.parallel.ring_attention import RingPlan, build_plan, gather_doc_ids, ring_attention


class ContextParallel:
    def __init__(self, group) -> None:
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def shard(self, *tensors: torch.Tensor | None):
        """This rank's head-tail shard of each (B, T, ...) tensor along the sequence."""
        return tuple(
            None if t is None else shard_head_tail(t, self.cp, self.rank, dim=1) for t in tensors
        )

    def rope_and_mask(
        self, rope: torch.Tensor, doc_ids: torch.Tensor | None, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, CPMask]:
        """rope: the model's (max_seq_len, hd/2, 2) table; doc_ids: this rank's shard (B, T/cp)
        or None; tokens: (B, T/cp). Returns the rope rows of the local tokens and the plan."""
        local_len = tokens.shape[1]
        seq_len = local_len * self.cp
        whole_ids = None if doc_ids is None else gather_doc_ids(doc_ids, self.group)
        if whole_ids is None:
            rope = rope[head_tail_positions(seq_len, self.cp, self.rank, rope.device)]
        else:
            positions = document_positions(whole_ids)  # restart at each document, whole row
            rope = rope[shard_head_tail(positions, self.cp, self.rank, dim=1)]
        plan = build_plan(self.cp, self.rank, local_len, whole_ids, self.group, tokens.device)
        return rope, CPMask(plan)


class CPMask:
    """The attention 'mask' of a cp forward: attend() hands it q, k, v."""

    def __init__(self, plan: RingPlan) -> None:
        self.plan = plan

    # With train.compile the block around this call is compiled and the ring runs eagerly in
    # between (one graph break per block): Dynamo does not trace isend/irecv, and the ring's
    # own autograd.Function already overlaps each transfer with its block's kernel.
    @torch.compiler.disable
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ring_attention(q, k, v, self.plan)


def apply_cp(model, cp_mesh) -> None:
    """Make the model's forward context-parallel over `cp_mesh` (a 1-D mesh)."""
    model.context_parallel = ContextParallel(cp_mesh.get_group())


def cp_rows(model, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None):
    """(inputs, targets, document ids) a rank computes: with context parallelism its shard of
    each (document ids computed on the whole rows first: documents cross the shards)."""
    cp = find_context_parallel(model)
    return (inputs, targets, doc_ids) if cp is None else cp.shard(inputs, targets, doc_ids)


def find_context_parallel(model) -> ContextParallel | None:
    """The cp hook of a model or of its pipeline stages (LocalStages.parts; None: no context
    parallelism)."""
    for part in [model, *getattr(model, "parts", [])]:
        if (cp := getattr(part, "context_parallel", None)) is not None:
            return cp
    return None
