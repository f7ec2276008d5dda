"""Tokens/s of the training step per parallel layout, on this machine's CPU (gloo).

    python bench/cpu_layouts.py [--preset small] [--steps 12] [--data data/stdlib]

Each layout runs as a real `triaxis train` / `triaxis launch` job; the figure is the mean
tokens/s of the logged steps after the first (warm-up) one. Not a test: prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "1 process": (1, []),
    "dp_shard=2 (MiCS/FSDP)": (2, ["--parallel.dp_shard=2"]),
    "dp_replicate=2 (DDP)": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    "tp=2": (2, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    "dp_shard=2, full AC": (2, ["--parallel.dp_shard=2", "--parallel.activation_checkpoint=full"]),
}


def run(data: str, preset: str, steps: int, seq: int, nproc: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"--model.preset={preset}",
            f"--data.path={data}",
            f"--data.seq_len={seq}",
            f"--train.run_dir={tmp}",
            f"--train.steps={steps}",
            "--train.global_batch=16",
            f"--train.micro_batch={16 // (nproc if 'tp' not in str(extra) else 1)}",
            "--train.val_every=0",
            "--checkpoint.interval=0",
            "--checkpoint.save_final=false",
            "--metrics.log_every=2",
            "--metrics.tensorboard=false",
            "--metrics.progress=false",
            *extra,
        ]
        cmd = [sys.executable, "-m", "triaxis"]
        cmd += (
            ["train", *common] if nproc == 1 else ["launch", f"--nproc-per-node={nproc}", *common]
        )
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ})
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:]
    return sum(rates) / len(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--data", default="data/stdlib")
    a = ap.parse_args()
    results = {}
    for name, (nproc, extra) in LAYOUTS.items():
        results[name] = run(a.data, a.preset, a.steps, a.seq, nproc, extra)
        print(f"{name:<28} {results[name]:>10,.0f} tokens/s", flush=True)
    print(
        json.dumps(
            {
                "preset": a.preset,
                "seq": a.seq,
                "global_batch": 16,
                "cpu_count": os.cpu_count(),
                "tokens_per_s": results,
            }
        )
    )


if __name__ == "__main__":
    main()
