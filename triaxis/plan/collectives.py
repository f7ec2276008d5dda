"""Collective and point-to-point times over the link a mesh axis runs on (the planner's
network model; triaxis.plan.steptime adds them up).

The standard ring / tree formulas.

For a group of n ranks and a buffer of S bytes (the full, unsharded size) over bus bandwidth B:

    all-reduce      ring  2(n-1)/n · S/B + 2(n-1) step latencies
                    tree  2 · S/B + 2·log2(n) step latencies    (NCCL picks the faster)
    all-gather      ring  (n-1)/n · S/B + (n-1) step latencies  (S = gathered output)
    reduce-scatter  ring  (n-1)/n · S/B + (n-1) step latencies  (S = unreduced input)
    send/recv       S/B + one step latency
    all-to-all      each rank sends S' = (n-1)/n of its buffer: its in-node share over NVLink
                    and the rest over its network share at once, + (n-1) step latencies

plus a fixed launch cost per collective. Which link: mesh axes are laid out pp x dp_replicate x
dp_shard x tp, tp innermost (triaxis.parallel.dims), so an axis of size n and rank stride st has
min(n, gpus_per_node // st) members in each node. A group inside one node runs at the NVLink bus
bandwidth. A group spanning nodes is bound by the network: with rail-aligned NICs, a ring that
has g members in every node drives g NICs at once (NCCL runs one channel per NIC), so its bus
bandwidth is g x (the node's network bandwidth / gpus per node), capped by NVLink. Collectives of
different axes are assumed not to contend for the same link (they rarely run at the same time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from triaxis.plan.hardware import Hardware


@dataclass(frozen=True)
class AxisLink:
    size: int
    """Ranks in one group of this axis."""
    per_node: int
    """Members of one group inside one node."""
    bus_bytes_per_s: float
    step_latency_s: float
    """Mean latency of one ring step: network steps for the hops between nodes, NVLink else."""
    launch_s: float

    @property
    def nodes(self) -> int:
        return max(1, self.size // self.per_node)


def axis_link(hw: Hardware, size: int, stride: int) -> AxisLink:
    """The link of a mesh axis of `size` ranks whose neighbours are `stride` ranks apart."""
    gpn, c = hw.gpus_per_node, hw.cluster
    per_node = max(1, min(size, gpn // stride)) if stride <= gpn else 1
    if per_node >= size:
        return AxisLink(
            size, size, c.nvlink_bytes_per_s, c.nvlink_latency_s, hw.calib.collective_launch_s
        )
    bus = min(c.nvlink_bytes_per_s, per_node * hw.network_bytes_per_s_per_gpu)
    nodes = size // per_node
    # A ring over all members crosses the network once per node and NVLink otherwise.
    lat = (nodes * c.network_latency_s + (size - nodes) * c.nvlink_latency_s) / size
    return AxisLink(size, per_node, bus, lat, hw.calib.collective_launch_s)


def all_reduce_s(link: AxisLink, nbytes: float) -> float:
    n = link.size
    if n == 1 or nbytes == 0:
        return 0.0
    ring = 2 * (n - 1) / n * nbytes / link.bus_bytes_per_s + 2 * (n - 1) * link.step_latency_s
    tree = 2 * nbytes / link.bus_bytes_per_s + 2 * math.ceil(math.log2(n)) * link.step_latency_s
    return link.launch_s + min(ring, tree)


def all_gather_s(link: AxisLink, nbytes: float) -> float:
    """`nbytes` is the gathered (full) size; each rank contributes nbytes / n."""
    n = link.size
    if n == 1 or nbytes == 0:
        return 0.0
    return (
        link.launch_s + (n - 1) / n * nbytes / link.bus_bytes_per_s + (n - 1) * link.step_latency_s
    )


def reduce_scatter_s(link: AxisLink, nbytes: float) -> float:
    """`nbytes` is the unreduced input size; each rank keeps nbytes / n."""
    return all_gather_s(link, nbytes)


def all_to_all_s(hw: Hardware, link: AxisLink, sent: float) -> float:
    """An all-to-all in which every rank sends `sent` bytes to the others, spread evenly: the
    share for peers in its node goes over NVLink, the rest over its share of the node's
    network, both at once; one step latency per peer."""
    n = link.size
    if n == 1 or sent == 0:
        return 0.0
    inside = (link.per_node - 1) / (n - 1)
    net = (1 - inside) * sent / hw.network_bytes_per_s_per_gpu
    nvl = inside * sent / hw.cluster.nvlink_bytes_per_s
    return link.launch_s + max(net, nvl) + (n - 1) * link.step_latency_s


def hierarchical_applies(gpus_per_node: int, dp_shard: int, tp: int) -> bool:
    """Does a dp_shard group (stride tp) span whole nodes with several members in each? Then
    the trainer can gather it in two phases (triaxis.parallel.hierarchical)."""
    group = dp_shard * tp
    return group > gpus_per_node and group % gpus_per_node == 0 and gpus_per_node // tp > 1


def hierarchical_gather_s(hw: Hardware, size: int, stride: int, nbytes: float) -> float:
    """MiCS two-phase all-gather (or, mirrored, reduce-scatter) of `nbytes` over a group that
    spans n nodes with g members each: across nodes among the g same-local-rank peers at once,
    each ring on its own NIC gathering nbytes / g, then inside the node over NVLink. Per NIC the
    cross-node bytes are (n-1)/n·S/g against the flat ring's (ng-1)/(ng)·S/g (that ring also
    runs g channels, one per NIC); the NVLink phase is not overlapped with it."""
    flat = axis_link(hw, size, stride)
    g, n = flat.per_node, flat.nodes
    across = axis_link(hw, n, stride * g)  # one member per node: one NIC each
    within = axis_link(hw, g, stride)
    return all_gather_s(across, nbytes / g) + all_gather_s(within, nbytes)


def p2p_s(hw: Hardware, nbytes: float, crosses_node: bool) -> float:
    """One pipeline send/recv between neighbouring stages. Across nodes every GPU sends to its
    counterpart at once, so each gets its share of the node's network bandwidth."""
    if nbytes == 0:
        return 0.0
    c = hw.cluster
    if crosses_node:
        return (
            hw.calib.collective_launch_s
            + c.network_latency_s
            + nbytes / hw.network_bytes_per_s_per_gpu
        )
    return hw.calib.collective_launch_s + c.nvlink_latency_s + nbytes / c.nvlink_bytes_per_s
