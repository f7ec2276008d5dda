"""`triaxis plot RUN_DIR...`: loss, validation loss, tokens/s and gradient norm against step, as
one SVG, several runs overlaid.

Written by hand (as `triaxis layout --svg` is): no plotting package to install on a cluster's
login node, and the file opens in any browser. Each run's metrics.jsonl is read as written: a
resumed run re-logs steps, the last record of a step wins.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from triaxis.errors import UserError

PANELS = (
    ("loss", "training loss"),
    ("val_loss", "validation loss"),
    ("tokens_per_s", "tokens/s"),
    ("grad_norm", "gradient norm (pre-clip)"),
)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
PANEL_W, PANEL_H, MARGIN = 460, 260, 56


def read_series(run_dir: str) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of every panel's key in RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(
            f"{run_dir}: no metrics.jsonl; give the run folder of a training run "
            "(its train.run_dir)"
        )
    series: dict[str, dict[int, float]] = {key: {} for key, _ in PANELS}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(
                f"{path} line {number} is not JSON; fix or delete that line and plot again"
            ) from None
        for key, _ in PANELS:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                series[key][int(record["step"])] = float(value)
    return series


def _polyline(points: list[tuple[float, float]], box, color: str) -> str:
    (x0, x1), (y0, y1), (left, top) = box
    span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    xy = " ".join(
        f"{left + (x - x0) / span_x * PANEL_W:.1f},"
        f"{top + PANEL_H - (y - y0) / span_y * PANEL_H:.1f}"  # SVG's y grows downwards
        for x, y in points
    )
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{xy}"/>'


def _panel(key: str, title: str, runs: list[dict], left: int, top: int) -> list[str]:
    lines = [
        f'<rect x="{left}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
        'stroke="#999"/>',
        f'<text x="{left}" y="{top - 8}" font-size="14">{escape(title)}</text>',
    ]
    points = [sorted(run[key].items()) for run in runs]
    every = [p for run in points for p in run]
    if not every:
        lines.append(
            f'<text x="{left + 12}" y="{top + PANEL_H // 2}" font-size="12" fill="#999">'
            f"no {escape(key)} in these runs</text>"
        )
        return lines
    xs, ys = [x for x, _ in every], [y for _, y in every]
    box = ((min(xs), max(xs)), (min(ys), max(ys)), (left, top))
    for i, run in enumerate(points):
        if run:
            lines.append(_polyline(run, box, COLORS[i % len(COLORS)]))
    for value, y in ((max(ys), top + 12), (min(ys), top + PANEL_H - 4)):
        lines.append(
            f'<text x="{left - 4}" y="{y}" font-size="10" text-anchor="end">{value:.4g}</text>'
        )
    for value, anchor, x in ((min(xs), "start", left), (max(xs), "end", left + PANEL_W)):
        lines.append(
            f'<text x="{x}" y="{top + PANEL_H + 14}" font-size="10" text-anchor="{anchor}">'
            f"step {value}</text>"
        )
    return lines


def plot(run_dirs: list[str], output: str) -> str:
    """Write the SVG of `run_dirs` to `output`; returns a one-line summary."""
    if not output.endswith(".svg"):
        raise UserError(
            f"--output {output}: triaxis plot writes SVG (no plotting package needed); "
            "name the file *.svg (a browser or `rsvg-convert` turns it into PNG)"
        )
    runs = [read_series(d) for d in run_dirs]
    names = [Path(d).resolve().name for d in run_dirs]
    width = 2 * (PANEL_W + 2 * MARGIN)
    height = 2 * (PANEL_H + 2 * MARGIN) + 20 * len(names)
    body = []
    for i, (key, title) in enumerate(PANELS):
        left = MARGIN + (i % 2) * (PANEL_W + 2 * MARGIN)
        top = MARGIN + (i // 2) * (PANEL_H + 2 * MARGIN)
        body += _panel(key, title, runs, left, top)
    legend_top = 2 * (PANEL_H + 2 * MARGIN)
    for i, name in enumerate(names):
        y = legend_top + 20 * i + 10
        color = COLORS[i % len(COLORS)]
        body.append(
            f'<line x1="{MARGIN}" y1="{y}" x2="{MARGIN + 24}" y2="{y}" stroke="{color}" '
            'stroke-width="3"/>'
        )
        body.append(f'<text x="{MARGIN + 32}" y="{y + 4}" font-size="12">{escape(name)}</text>')
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
        + "\n".join(body)
        + "\n</svg>\n"
    )
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(svg)
    tmp.replace(out)  # a reader never sees half a picture
    drawn = sum(bool(run[k]) for run in runs for k, _ in PANELS)
    return f"wrote {output}: {len(runs)} run(s), {drawn} series"
