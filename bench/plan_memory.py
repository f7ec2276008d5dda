"""Predicted vs measured per-rank bytes of parameters, gradients and AdamW states (CPU).

    python bench/plan_memory.py            # the matrix below, one process per (world, rank)

Each measurement builds the real triaxis layout (parallelize: TP, then FSDP2 MiCS sharding) in a
process that joins a fake process group as one rank, runs a step, and sums the local tensors
(triaxis.plan.evidence); the prediction is triaxis.plan.predict_state_bytes_per_rank(...,
rank=r). Ranks 0 and world-1 are measured: with dp_shard = 3 or 6 on a 64-wide model the last
shards are shorter than rank 0's (which equals every rank's padded FSDP allocation).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from triaxis.plan.evidence import MeasuredLayout
from triaxis.plan.memory import predict_state_bytes_per_rank

MATRIX = [
    MeasuredLayout("tiny", 1, 1, 1),
    MeasuredLayout("tiny", 1, 1, 2),
    MeasuredLayout("tiny", 1, 2, 1),
    MeasuredLayout("tiny", 2, 1, 1),
    MeasuredLayout("tiny", 1, 4, 1),
    MeasuredLayout("tiny", 2, 2, 1),
    MeasuredLayout("tiny", 1, 2, 2),
    MeasuredLayout("tiny", 2, 1, 2),
    MeasuredLayout("tiny", 1, 2, 2, tied=True),
    MeasuredLayout("tiny", 1, 3, 1),
    MeasuredLayout("tiny", 1, 3, 2),
    MeasuredLayout("tiny", 2, 3, 1),
    MeasuredLayout("tiny", 1, 6, 1),
    MeasuredLayout("tiny", 1, 8, 1),
    MeasuredLayout("tiny", 2, 4, 1),
    MeasuredLayout("tiny", 1, 4, 2),
    MeasuredLayout("tiny", 2, 2, 2),
    MeasuredLayout("small", 1, 2, 2),
]


def _spec(m: MeasuredLayout) -> str:
    tied = "" if m.tied is None else (":tied" if m.tied else ":untied")
    return f"{m.preset}:{m.dp_replicate}:{m.dp_shard}:{m.tp}{tied}"


def run_group(world: int, rank: int, layouts: list[MeasuredLayout]) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "triaxis.plan.evidence", "measure", str(rank), *map(_spec, layouts)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(layouts: list[MeasuredLayout], jobs: int = 2) -> list[dict]:
    groups: dict[tuple[int, int], list[MeasuredLayout]] = {}
    for m in layouts:
        for rank in sorted({0, m.world_size - 1}):
            groups.setdefault((m.world_size, rank), []).append(m)
    rows = []
    with ThreadPoolExecutor(jobs) as pool:
        futures = {key: pool.submit(run_group, *key, ms) for key, ms in groups.items()}
        for (world, rank), fut in futures.items():
            for m, got in zip(groups[(world, rank)], fut.result()):
                pred = predict_state_bytes_per_rank(
                    m.model_args(), m.dp_shard, m.dp_replicate, m.tp, 1, rank=rank
                )
                rows.append(
                    {
                        "layout": _spec(m),
                        "world": world,
                        "rank": rank,
                        **{f"{k}_measured": got[k] for k in got},
                        **{f"{k}_predicted": pred[k] for k in got},
                        "max_rel_error": max(abs(pred[k] / got[k] - 1) for k in got),
                    }
                )
    return rows


if __name__ == "__main__":
    rows = compare(MATRIX)
    print(
        "| layout (preset:dp_rep:dp_shard:tp) | rank | params meas / pred | grads meas / pred "
        "| optim meas / pred | max error |"
    )
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["world"], r["layout"], r["rank"])):
        cells = " | ".join(
            f"{r[k + '_measured']} / {r[k + '_predicted']}" for k in ("params", "grads", "optim")
        )
        print(f"| {r['layout']} | {r['rank']} | {cells} | {r['max_rel_error']:.2%} |")
    worst = max(r["max_rel_error"] for r in rows)
    print(f"\nworst relative error: {worst:.2%} over {len(rows)} (layout, rank) pairs")
