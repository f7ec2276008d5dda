"""The GPU session's summary table, from its rows (bench/gpu_session.py prints it last).

    python bench/gpu_summary.py OUT/rows.jsonl      # again, from the rows that came back

A rerun of a part replaces its earlier row (the last row of each part counts). Ratios pair
triaxis with the peer at the same compile setting; the FSDP row is read against the plain
compiled row (the wrapper's cost at dp_shard=1); CHECK lines are the checks' own verdicts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPEED_PARTS = ("triaxis-compiled", "hf-compiled", "triaxis-eager", "hf-eager", "triaxis-fsdp")


def _latest(rows: list[dict]) -> dict[str, dict]:
    by_part: dict[str, dict] = {}
    for row in rows:
        by_part.pop(row["part"], None)  # keep the order of the latest runs
        by_part[row["part"]] = row
    return by_part


def _ratio(by_part: dict, a: str, b: str) -> float | None:
    ra, rb = by_part.get(a, {}), by_part.get(b, {})
    if ra.get("ok") and rb.get("ok") and rb.get("tokens_per_s"):
        return ra["tokens_per_s"] / rb["tokens_per_s"]
    return None


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def summary_text(rows: list[dict]) -> str:
    by_part = _latest(rows)
    lines = [
        "== summary (from rows.jsonl)",
        f"| {'part':<17}| ok  | {'tokens/s':>10} | {'MFU':>6} | {'peak GiB':>8} | {'wall s':>6} |"
        " error",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in by_part.items():
        error = (r.get("error") or "").splitlines()[0][:100] if not r.get("ok") else ""
        lines.append(
            f"| {name:<17}| {'yes' if r.get('ok') else 'NO ':<3} "
            f"| {_fmt(r.get('tokens_per_s'), '>10,.0f')} | {_fmt(r.get('mfu'), '>5.1f', 100)}"
            f"{'%' if r.get('mfu') is not None else ' '} | {_fmt(r.get('peak_mem_gib'), '>8.2f')} "
            f"| {_fmt(r.get('wall_s'), '>6.0f')} | {error}"
        )
    pairs = [
        ("triaxis/HF compiled", "triaxis-compiled", "hf-compiled"),
        ("triaxis/HF eager", "triaxis-eager", "hf-eager"),
        ("triaxis FSDP(dp_shard=1)/plain, both compiled", "triaxis-fsdp", "triaxis-compiled"),
    ]
    for label, a, b in pairs:
        ratio = _ratio(by_part, a, b)
        got = f"{ratio:.3f}x tokens/s" if ratio else "n/a (a row failed or did not run)"
        lines.append(f"{label}: {got}")
    for r in by_part.values():
        lines += [f"CHECK {c}" for c in r.get("checks", [])]
    failed = [n for n, r in by_part.items() if not r.get("ok")]
    lines.append(f"parts ok: {len(by_part) - len(failed)}/{len(by_part)}" +
                 (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    rows_path = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/triaxis-gpu/rows.jsonl")
    print(summary_text([json.loads(x) for x in rows_path.read_text().splitlines()]))
