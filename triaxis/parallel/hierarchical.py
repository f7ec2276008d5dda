"""MiCS hierarchical collectives: a partition group (`dp_shard`) that spans nodes gathers in two
phases so the cross-node traffic leaves on every NIC at once (Zhang et al. 2022, MiCS, §3.3).

A group of n x g ranks over n nodes, g members per node, group rank = node x g + local:

    all-gather      1. across nodes, among the n ranks with the same local index (g disjoint
                       groups: each node's g NICs carry one each, in parallel), chunk -> n chunks
                    2. within the node, n chunks -> n x g chunks (NVLink)
                    then reorder (local, node) -> (node, local): the flat collective's order
    reduce-scatter  the mirror: 1. within the node, 2. across nodes (same local index)

Each rank receives (n-1) chunks across nodes, where a direct exchange over the whole group
receives (n-1) x g. Against NCCL's flat ring (one channel per NIC) each NIC's cross-node bytes
fall from (ng-1)/(ng)·S/g to (n-1)/n·S/g for a gathered size S: half at n = 2.
The result is the flat collective's, bit for bit in the all-gather; the reduce-scatter sums in
a different order (fp rounding only).

FSDP2 takes both through `FSDPModule.set_custom_all_gather / set_custom_reduce_scatter`. They
run synchronously on the stream FSDP calls them on (its all-gather / reduce-scatter stream on a
GPU), which is what FSDP's default collectives do when it does not ask for a handle.

Node size: torchrun's LOCAL_WORLD_SIZE (ranks are numbered node by node); without it the job
is one node. Tests simulate several nodes on one host by setting it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# The protocol classes FSDPModule.set_custom_all_gather/_reduce_scatter take (torch 2.13 does
# not re-export them from torch.distributed.fsdp).
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from triaxis.errors import UserError
from triaxis.parallel.compat import all_gather_single, reduce_scatter_single
from triaxis.parallel.dims import AXES, ParallelDims


def node_size(world_size: int, environ=os.environ) -> int:
    """Ranks per node: torchrun's LOCAL_WORLD_SIZE, else the whole world is one node."""
    return int(environ.get("LOCAL_WORLD_SIZE", world_size))


def shard_groups(dims: ParallelDims) -> list[list[int]]:
    """Every dp_shard group's global ranks, in group-rank order (all ranks list the same)."""
    grid = np.arange(dims.world_size).reshape(dims.shape)
    shard_axis = AXES.index("dp_shard")
    return np.moveaxis(grid, shard_axis, -1).reshape(-1, dims.dp_shard).tolist()


@dataclass(frozen=True)
class NodeSplit:
    nodes: int
    """Nodes one dp_shard group spans (n)."""
    per_node: int
    """Members of one group in each node (g)."""
    reason: str = ""
    """Why the split is not usable (empty: it is)."""

    @property
    def spans_nodes(self) -> bool:
        return not self.reason and self.nodes > 1


def node_split(dims: ParallelDims, ranks_per_node: int) -> NodeSplit:
    """How the dp_shard groups sit on nodes of `ranks_per_node` consecutive ranks."""
    if dims.dp_shard == 1:
        return NodeSplit(1, 1, "dp_shard=1 has no partition group to gather in")
    if ranks_per_node < 1 or dims.world_size % ranks_per_node:
        return NodeSplit(
            1, 1, f"world {dims.world_size} is not whole nodes of {ranks_per_node} ranks"
        )
    split = None
    for members in shard_groups(dims):
        nodes = [r // ranks_per_node for r in members]
        distinct = list(dict.fromkeys(nodes))
        per_node = len(members) // len(distinct)
        # Node-major and the same count on every node: group rank = node x g + local.
        if nodes != [n for n in distinct for _ in range(per_node)]:
            return NodeSplit(
                len(distinct),
                1,
                f"dp_shard group {members} does not sit evenly on nodes of {ranks_per_node} ranks",
            )
        if split not in (None, (len(distinct), per_node)):
            return NodeSplit(1, 1, f"dp_shard groups sit differently on nodes of {ranks_per_node}")
        split = (len(distinct), per_node)
    assert split is not None
    return NodeSplit(*split)


def resolve(mode: str, dims: ParallelDims, ranks_per_node: int) -> NodeSplit | None:
    """The split to gather hierarchically over, or None for the flat collectives.

    auto: on when a dp_shard group spans nodes with more than one member in each (with one
    member per node the first phase is already the whole flat gather).
    """
    if mode == "off" or dims.cp > 1:  # cp with "on": refused by config.rules
        return None
    split = node_split(dims, ranks_per_node)
    if mode == "auto":
        return split if split.spans_nodes and split.per_node > 1 else None
    if not split.spans_nodes:
        why = split.reason or f"each dp_shard={dims.dp_shard} group is inside one node"
        raise UserError(
            f"parallel.hierarchical=on needs a dp_shard group that spans nodes ({ranks_per_node} "
            f"ranks per node), but {why}; set --parallel.hierarchical=auto or off"
        )
    return split


def describe(mode: str, dims: ParallelDims) -> str:
    """One log line when the gathers are hierarchical, else empty."""
    split = resolve(mode, dims, node_size(dims.world_size))
    if split is None:
        return ""
    return (
        f"MiCS hierarchical all-gather / reduce-scatter: each dp_shard group spans "
        f"{split.nodes} nodes x {split.per_node} ranks (across nodes among same-local ranks, "
        "then within the node)"
    )


def refuse_without_shards(dims: ParallelDims) -> None:
    """parallel.hierarchical=on where nothing is sharded (no FSDP): a UserError, not a no-op."""
    resolve("on", dims, node_size(dims.world_size))


def build_groups(
    dims: ParallelDims, split: NodeSplit, rank: int
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(across nodes: same local index; within the node) groups of this rank. Collective: every
    rank creates every group, in the same order."""
    g, n = split.per_node, split.nodes
    across = within = None
    for members in shard_groups(dims):
        blocks = [members[k * g : (k + 1) * g] for k in range(n)]  # one per node
        for local in range(g):
            ranks = [blocks[k][local] for k in range(n)]
            pg = dist.new_group(ranks)
            across = pg if rank in ranks else across
        for ranks in blocks:
            pg = dist.new_group(ranks)
            within = pg if rank in ranks else within
    assert across is not None and within is not None, (rank, split)
    return across, within


class _TwoPhase:
    def __init__(self, across: dist.ProcessGroup, within: dist.ProcessGroup, split: NodeSplit):
        self.across, self.within = across, within
        self.nodes, self.per_node = split.nodes, split.per_node

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _check(self, group: dist.ProcessGroup) -> None:
        assert group.size() == self.nodes * self.per_node, (group.size(), self.nodes)


class HierarchicalAllGather(_TwoPhase, AllGather):
    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self._check(group)
        n, g, chunk = self.nodes, self.per_node, input_tensor.numel()
        # `input_tensor` is a view into `output_tensor`: read it out before writing the output.
        across = torch.empty(n * chunk, dtype=input_tensor.dtype, device=input_tensor.device)
        all_gather_single(across, input_tensor.contiguous(), group=self.across)
        within = torch.empty(g * n * chunk, dtype=input_tensor.dtype, device=input_tensor.device)
        all_gather_single(within, across, group=self.within)
        # (local, node, chunk) -> the flat order (node, local, chunk).
        output_tensor.view(n, g, chunk).copy_(within.view(g, n, chunk).transpose(0, 1))
        return None


class HierarchicalReduceScatter(_TwoPhase, ReduceScatter):
    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self._check(group)
        n, g, chunk = self.nodes, self.per_node, output_tensor.numel()
        # Chunks in flat order (node, local); phase 1 hands each local rank its column.
        by_local = input_tensor.view(n, g, chunk).transpose(0, 1).reshape(-1)
        partial = torch.empty(n * chunk, dtype=input_tensor.dtype, device=input_tensor.device)
        reduce_scatter_single(partial, by_local, op=op, group=self.within)
        # SUM/AVG/MIN/MAX compose with themselves (AVG: equal-sized groups); a pre-multiplied
        # sum has already scaled every term in phase 1.
        second = dist.ReduceOp.SUM if op == dist.ReduceOp.PREMUL_SUM else op
        reduce_scatter_single(output_tensor, partial, op=second, group=self.across)
        return None


def hierarchical_comms(
    mode: str, dims: ParallelDims
) -> tuple[HierarchicalAllGather, HierarchicalReduceScatter] | None:
    """The two-phase collectives for this rank's dp_shard group, or None (flat)."""
    world = dims.world_size
    split = resolve(mode, dims, node_size(world))
    if split is None:
        return None
    across, within = build_groups(dims, split, dist.get_rank())
    return (
        HierarchicalAllGather(across, within, split),
        HierarchicalReduceScatter(across, within, split),
    )
