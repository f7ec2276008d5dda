"""Loader tokens/s from local disk and from S3 (moto's S3 server on loopback), beside the rate
the training step consumes; cache hit rate; data-wait share of step time.

    python bench/data_loader.py [--seq 128] [--batch 8] [--steps 24] [--train-tokens-per-s X]

1. Prepares ~8 MB of the embedded corpus (byte tokenizer, 1M-token shards) locally and copies it
   to a bucket on a moto S3 server on loopback.
2. Loader alone: `batch(cursor, batch)` back to back over consecutive steps (the trainer's
   access pattern: a global shuffle over all windows), for local memory-mapped shards and for
   S3 cold (empty cache, no prefetch), S3 with prefetch (the trainer's call: this step and the
   next), S3 warm (every shard cached), S3 with a cache of 3 or 4 shards (thrashing), and the
   cache of 4 shards with the shard-group shuffle (data.shuffle_shards=1), which it suffices for.
3. The training step's rate: the `small` preset trained for a few steps on this CPU (or
   --train-tokens-per-s). Then a training loop where the step's compute is a sleep of that
   measured step time (as on a GPU, where the step leaves the host CPU to the loader) gives the
   data-wait share of step time per source.

moto on loopback has no network latency or bandwidth limit of its own; real S3 is slower per
request (tens of ms) and faster in aggregate. Not a test: prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3_server (moto)


def prepare_data(tmp: Path, corpus_bytes: int, shard_tokens: int) -> tuple[str, str]:
    import boto3

    from triaxis.data.prepare import PrepareOptions, prepare

    local = tmp / "local"
    prepare(
        PrepareOptions(
            inputs=[],
            output=str(local),
            tokenizer="byte",
            max_bytes=corpus_bytes,
            shard_tokens=shard_tokens,
            workers=1,
        ),
        log=lambda *_: None,
    )
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for f in sorted(local.iterdir()):
        client.put_object(Bucket="bench", Key=f"data/{f.name}", Body=f.read_bytes())
    return str(local), "s3://bench/data"


def loader_rate(ds, steps: int, batch: int, seq: int, prefetch: bool) -> dict:
    """Back-to-back batches, no compute: the loader's own tokens/s."""
    t0 = time.perf_counter()
    for step in range(steps):
        cursor = step * batch
        if prefetch:
            ds.prefetch(cursor, 2 * batch)
        ds.batch(cursor, batch)
    elapsed = time.perf_counter() - t0
    out = {"tokens_per_s": steps * batch * seq / elapsed}
    if ds.cache is not None:
        s = ds.cache.stats
        out.update(
            hit_rate=s.hit_rate, downloaded_mib=s.downloaded_bytes / 2**20, evictions=s.evictions
        )
    return out


def train_rate(vocab: int, seq: int, batch: int, steps: int) -> float:
    """Tokens/s of the `small` preset's training step (forward, backward, AdamW) on this CPU."""
    import torch
    import torch.nn.functional as F

    from triaxis.config import ModelConfig
    from triaxis.model import Transformer, build_model_args

    torch.manual_seed(0)
    args = build_model_args(ModelConfig(preset="small"), vocab_size=vocab)
    model = Transformer(args)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return batch * seq / (sum(times[1:]) / steps)


def data_wait(ds, steps: int, batch: int, step_s: float, prefetch: bool) -> tuple[float, float]:
    """(seconds the first step waited for its batch, share of step time spent waiting over the
    steps after it), with each step's compute a sleep of step_s."""
    waits, totals = [], []
    for step in range(steps):
        cursor = step * batch
        t0 = time.perf_counter()
        if prefetch:
            ds.prefetch(cursor, 2 * batch)  # its own cost counts as waiting too
        ds.batch(cursor, batch)
        waits.append(time.perf_counter() - t0)
        time.sleep(step_s)
        totals.append(time.perf_counter() - t0)
    return waits[0], sum(waits[1:]) / sum(totals[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="samples per step")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument(
        "--wait-steps",
        type=int,
        default=8,
        help="steps of the loop with compute (a sleep of the step time)",
    )
    ap.add_argument("--corpus-bytes", type=int, default=8_000_000)
    ap.add_argument("--shard-tokens", type=int, default=1_000_000)
    ap.add_argument(
        "--train-tokens-per-s",
        type=float,
        default=0.0,
        help="the training step's rate (0 = measure `small` on this CPU); e.g. a "
        "GPU's rate, to see where the loader would stall it",
    )
    a = ap.parse_args()

    import torch  # noqa: F401  (imported now: batch() would import it inside the first timing)

    from triaxis.data.dataset import TokenDataset

    tmp = Path(tempfile.mkdtemp(prefix="triaxis-bench-"))
    from tests.s3_server import serve_for_this_process

    server, _ = serve_for_this_process()
    try:
        local_path, s3_path = prepare_data(tmp, a.corpus_bytes, a.shard_tokens)
        shard_bytes = a.shard_tokens * 2

        def open_ds(path: str, cache_gib: float = 4.0, groups: int = 0):
            return TokenDataset(
                path,
                "train",
                a.seq,
                seed=1,
                cache_dir=str(tmp / "cache"),
                cache_gib=cache_gib,
                shuffle_shards=groups,
            )

        n_shards = len(open_ds(local_path).shards)
        results: dict[str, dict] = {}
        ds = open_ds(local_path)
        results["local (mmap)"] = loader_rate(ds, a.steps, a.batch, a.seq, prefetch=False)
        ds = open_ds(s3_path)
        results["s3 cold, no prefetch"] = loader_rate(ds, a.steps, a.batch, a.seq, False)
        ds.close()
        ds = open_ds(s3_path)
        results["s3 cold, prefetch"] = loader_rate(ds, a.steps, a.batch, a.seq, True)
        ds.cache.stats.__init__()  # every shard is cached now: count the warm pass alone
        results["s3 warm"] = loader_rate(ds, a.steps, a.batch, a.seq, True)
        ds.close()
        ds = open_ds(s3_path, cache_gib=3.2 * shard_bytes / 2**30)
        results["s3, cache of 3 shards"] = loader_rate(ds, a.steps, a.batch, a.seq, True)
        ds.close()
        # The same small cache with the shard-group shuffle (data.shuffle_shards=1: a cache of
        # 4 shards is what it asks for).
        small = 4.2 * shard_bytes / 2**30
        ds = open_ds(s3_path, cache_gib=small)
        results["s3, cache of 4 shards"] = loader_rate(ds, a.steps, a.batch, a.seq, True)
        ds.close()
        ds = open_ds(s3_path, cache_gib=small, groups=1)
        results["s3, 4 shards, groups=1"] = loader_rate(ds, a.steps, a.batch, a.seq, True)
        ds.close()

        train_tps = a.train_tokens_per_s or train_rate(257, a.seq, a.batch, steps=3)
        step_s = a.batch * a.seq / train_tps
        waits = {}
        for name, path, gib, prefetch in (
            ("local (mmap)", local_path, 4.0, False),
            ("s3 cold, prefetch", s3_path, 4.0, True),
            ("s3 cold, no prefetch", s3_path, 4.0, False),
            ("s3, cache of 3 shards", s3_path, 3.2 * shard_bytes / 2**30, True),
            ("s3, 4 shards, groups=1", s3_path, 4.2 * shard_bytes / 2**30, True),
        ):
            ds = open_ds(path, gib, groups=1 if "groups" in name else 0)
            waits[name] = data_wait(ds, a.wait_steps, a.batch, step_s, prefetch)
            if ds.cache is not None:
                ds.close()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"{n_shards} shards of {a.shard_tokens:,} tokens ({shard_bytes / 2**20:.1f} MiB); "
        f"steps of {a.batch} x {a.seq} tokens, global shuffle unless `groups=N` "
        "(data.shuffle_shards)"
    )
    source = "given" if a.train_tokens_per_s else "`small`, measured on this CPU"
    print(f"training step ({source}): {train_tps:,.0f} tokens/s ({step_s * 1000:.0f} ms per step)")
    print(
        f"{'source':<23}{'loader tok/s':>13}{'x train':>9}{'hit rate':>9}{'MiB got':>9}"
        f"{'1st step wait':>14}{'then data wait':>15}"
    )
    for name, r in results.items():
        hit = f"{r['hit_rate']:.0%}" if "hit_rate" in r else "-"
        mib = f"{r['downloaded_mib']:.1f}" if "downloaded_mib" in r else "-"
        first, share = (
            (f"{waits[name][0]:.3f} s", f"{waits[name][1]:.1%}") if name in waits else ("-", "-")
        )
        print(
            f"{name:<23}{r['tokens_per_s']:>13,.0f}{r['tokens_per_s'] / train_tps:>9.1f}"
            f"{hit:>9}{mib:>9}{first:>14}{share:>15}"
        )
    print(
        json.dumps(
            {
                "seq": a.seq,
                "batch": a.batch,
                "steps": a.steps,
                "shards": n_shards,
                "shard_tokens": a.shard_tokens,
                "train_tokens_per_s": train_tps,
                "loader": results,
                "data_wait": {
                    k: {"first_step_s": v[0], "share_after": v[1]} for k, v in waits.items()
                },
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
