"""Checkpoint throughput and training stall: sync vs async, local disk vs S3 on loopback.

    python bench/checkpoint_speed.py [--sizes 25 100 400] [--s3]

For each model size (millions of parameters; AdamW state makes the checkpoint ~12 bytes per
parameter), one process trains a step on synthetic data, then saves through triaxis's
Checkpointer. `blocking s` is how long training is held; `total s` runs until the checkpoint is
committed (manifest written); GB/s = checkpoint bytes / total. `--s3` adds moto's S3 server on
loopback (started here) as a target.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from triaxis.checkpoint import manifest as mf
from triaxis.config import load_config
from triaxis.train.distributed import init_distributed
from triaxis.train.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3_server (moto)


def dims_for(millions: float) -> tuple[int, int]:
    """(dim, layers) of a `small`-shaped model with about this many parameters."""
    layers = 8
    dim = int(math.sqrt(millions * 1e6 / (layers * 12.5)) // 64 * 64) or 64
    return dim, layers


def run(millions: float, target: str, async_save: bool) -> dict:
    dim, layers = dims_for(millions)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                "--model.preset=small",
                f"--model.dim={dim}",
                f"--model.n_layers={layers}",
                f"--model.n_heads={dim // 64}",
                "--model.n_kv_heads=1",
                f"--model.ffn_dim={dim * 3}",
                "--data.path=synthetic",
                "--data.seq_len=32",
                f"--train.run_dir={tmp}",
                "--train.global_batch=1",
                "--train.micro_batch=1",
                "--train.device=cpu",
                f"--checkpoint.dir={target or tmp + '/ckpt'}",
                "--checkpoint.keep_last=1",
                f"--checkpoint.async_save={str(async_save).lower()}",
                "--metrics.tensorboard=false",
                "--metrics.progress=false",
            ],
        )
        trainer = Trainer(cfg, init_distributed("cpu"))
        trainer.train_step(0, 1)
        t0 = time.perf_counter()
        trainer.ckpt.save(1, 1)
        blocking = time.perf_counter() - t0
        trainer.ckpt.close()
        total = time.perf_counter() - t0
        found = mf.list_checkpoints(cfg.checkpoint_dir())[-1]
        size = sum(f["size"] for f in mf.read_meta(found.path)["files"].values())
    return {
        "params_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 1),
        "target": "s3" if target else "local",
        "async": async_save,
        "bytes": size,
        "blocking_s": round(blocking, 3),
        "total_s": round(total, 3),
        "gb_per_s": round(size / total / 1e9, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[25, 100, 400])
    ap.add_argument("--s3", action="store_true")
    a = ap.parse_args()
    targets = [""]
    server = None
    if a.s3:
        import boto3

        from tests.s3_server import serve_for_this_process

        server, _ = serve_for_this_process()
        boto3.client("s3").create_bucket(Bucket="bench")
        targets.append("s3://bench/ckpt")
    print(
        f"{'params':>8} {'target':>6} {'mode':>6} {'GB':>7} {'blocking s':>11} {'total s':>8} "
        f"{'GB/s':>6}"
    )
    rows = []
    for m in a.sizes:
        for target in targets:
            for async_save in (False, True):
                r = run(m, target, async_save)
                rows.append(r)
                print(
                    f"{r['params_m']:>7}M {r['target']:>6} {'async' if async_save else 'sync':>6}"
                    f" {r['bytes'] / 1e9:>7.3f} {r['blocking_s']:>11.3f} {r['total_s']:>8.3f}"
                    f" {r['gb_per_s']:>6.3f}",
                    flush=True,
                )
    print(json.dumps(rows))
    if server:
        server.stop()


if __name__ == "__main__":
    main()
