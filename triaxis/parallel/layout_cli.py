"""`triaxis layout`: which rank holds which mesh coordinates, and (with --layers) which part of
which layer every GPU of every server holds; `--svg FILE` draws the same picture."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from triaxis.errors import UserError
from triaxis.parallel.dims import AXES, ParallelDims, layout_table


@dataclass
class Cell:
    rank: int
    node: int
    local: int
    coords: dict[str, int]
    layers: range | None


def even_split(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous blocks per pipeline stage, the remainder going to the last stages."""
    if num_stages > num_layers:
        raise UserError(
            f"--pp {num_stages} is larger than --layers {num_layers}: every stage "
            f"needs at least one layer; use --pp <= {num_layers}"
        )
    base, extra = divmod(num_layers, num_stages)
    sizes = [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def cells(dims: ParallelDims, gpus_per_node: int, num_layers: int) -> list[Cell]:
    split = even_split(num_layers, dims.pp) if num_layers else None
    out = []
    for row in layout_table(dims, gpus_per_node):
        coords = {a: row[a] for a in AXES}
        out.append(
            Cell(
                row["rank"],
                row["node"],
                row["local"],
                coords,
                split[coords["pp"]] if split else None,
            )
        )
    return out


def _what(c: Cell, dims: ParallelDims) -> str:
    parts = []
    if c.layers is not None:
        span = (
            f"layer {c.layers[0]}" if len(c.layers) == 1 else f"layers {c.layers[0]}-{c.layers[-1]}"
        )
        parts.append(span)
    if dims.tp > 1:
        parts.append(f"tp shard {c.coords['tp'] + 1}/{dims.tp}")
    if dims.cp > 1:
        parts.append(f"sequence chunks {_chunks(c, dims)}")
    if dims.shard_size > 1:
        parts.append(f"1/{dims.shard_size} of states")
    parts.append(
        f"replica {c.coords['dp_replicate'] * dims.dp_shard + c.coords['dp_shard']}"
        if dims.dp_shard == 1
        else f"group {c.coords['dp_replicate']}"
    )
    return ", ".join(parts)


def _chunks(c: Cell, dims: ParallelDims) -> str:
    """The head-tail chunks (of 2 x cp) of every sequence this rank holds."""
    head, tail = c.coords["cp"], 2 * dims.cp - 1 - c.coords["cp"]
    return f"{head},{tail}/{2 * dims.cp}"


def print_layout(a: argparse.Namespace) -> None:
    gpn = a.gpus_per_node
    cp = getattr(a, "cp", 1)
    ranks_needed = a.pp * a.tp * cp * a.dp_replicate * max(a.dp_shard, 1)
    world = a.world or a.nodes * gpn or ranks_needed
    dims = ParallelDims(a.dp_replicate, a.dp_shard, a.tp, a.pp, world, cp=cp)
    nodes = -(-world // gpn)
    grid = cells(dims, gpn, a.layers)  # before any output: a bad --pp/--layers prints nothing
    print(
        f"world {world} = {nodes} server(s) x {gpn} GPUs: {dims.describe()}  "
        "(tp innermost, then cp, then the MiCS partition group)"
    )
    if not a.layers:
        header = ["node", "local", "rank", *AXES]
        print("  ".join(f"{h:>12}" for h in header))
        for c in grid:
            values = {"node": c.node, "local": c.local, "rank": c.rank, **c.coords}
            print("  ".join(f"{values[h]:>12}" for h in header))
    else:
        for node in range(nodes):
            print(f"server {node}")
            for c in (c for c in grid if c.node == node):
                print(
                    f"  gpu {c.local}  rank {c.rank:>4}  stage {c.coords['pp']}:  {_what(c, dims)}"
                )
        copy = dims.pp * dims.tp * dims.cp
        print(
            f"one model copy = pp x cp x tp = {copy} GPUs = {copy / gpn:g} server(s); "
            f"{dims.dp_size} copies (data-parallel ranks)"
        )
    if dims.shard_size * dims.tp > gpn:
        print(
            f"note: a partition group x tp = {dims.shard_size * dims.tp} ranks spans servers; "
            "MiCS works best with it inside one server"
        )
    if a.svg:
        with open(a.svg, "w") as f:
            f.write(svg(dims, grid, gpn, nodes))
        print(f"wrote {a.svg}")


PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]


def svg(dims: ParallelDims, grid: list[Cell], gpn: int, nodes: int) -> str:
    """Servers as boxes, GPUs as cells coloured by pipeline stage, labelled with layers,
    tensor shard and sequence chunks."""
    cw, ch, pad, head = 118, 68, 12, 26
    width = pad * 2 + gpn * (cw + 6)
    height = pad + nodes * (ch + head + pad * 2)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for node in range(nodes):
        y0 = pad + node * (ch + head + pad * 2)
        out.append(
            f'<rect x="{pad / 2}" y="{y0}" width="{width - pad}" height="{ch + head + pad}"'
            ' fill="none" stroke="#333" rx="6"/>'
        )
        out.append(f'<text x="{pad}" y="{y0 + 16}" font-weight="bold">server {node}</text>')
        for c in (c for c in grid if c.node == node):
            x, y = pad + c.local * (cw + 6), y0 + head
            color = PALETTE[c.coords["pp"] % len(PALETTE)]
            out.append(
                f'<rect x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{color}" '
                'fill-opacity="0.8" rx="3"/>'
            )
            layers = (
                ""
                if c.layers is None
                else (f"L{c.layers[0]}" if len(c.layers) == 1 else f"L{c.layers[0]}-{c.layers[-1]}")
            )
            lines = [
                f"gpu {c.local} · stage {c.coords['pp']}",
                layers,
                f"tp {c.coords['tp'] + 1}/{dims.tp}" if dims.tp > 1 else "",
                f"cp chunks {_chunks(c, dims)}" if dims.cp > 1 else "",
            ]
            for i, text in enumerate(t for t in lines if t):
                out.append(f'<text x="{x + 5}" y="{y + 15 + 14 * i}" fill="white">{text}</text>')
    out.append("</svg>")
    return "\n".join(out)
