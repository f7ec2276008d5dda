"""`triaxis layout`: print which rank holds which mesh coordinates, node by node."""

from __future__ import annotations

import argparse

from triaxis.errors import UserError
from triaxis.parallel.dims import AXES, ParallelDims, layout_table


def print_layout(a: argparse.Namespace) -> None:
    world = a.world or a.nodes * a.gpus_per_node
    if world < 1:
        raise UserError("give --world N, or --nodes M (with --gpus-per-node, default 8)")
    dims = ParallelDims(a.dp_replicate, a.dp_shard, a.tp, a.pp, world)
    gpn = a.gpus_per_node if (a.nodes or world > a.gpus_per_node) else 0
    print(f"world {world}: {dims.describe()}  (tp innermost, then the MiCS partition group)")
    rows = layout_table(dims, gpn)
    header = (["node", "local"] if gpn else []) + ["rank", *AXES]
    print("  ".join(f"{h:>12}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]:>12}" for h in header))
    if gpn and dims.dp_shard * dims.tp > gpn:
        print(f"note: a partition group x tp = {dims.dp_shard * dims.tp} ranks spans nodes; "
              "MiCS works best with it inside one node")
