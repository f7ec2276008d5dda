"""Loader rate of a 3-source weighted mixture against one source, local and on S3 (moto's S3
server on loopback), in the same run; prints the ratios.

    python bench/data_mixture.py [--seq 256] [--batch 32] [--steps 60] [--corpus-bytes 3000000]

1. Prepares three sources from disjoint thirds of the embedded corpus (byte tokenizer, shards of
   --shard-tokens), locally, and copies them to a bucket on a moto S3 server.
2. The trainer's access pattern, back to back, no compute: per step `prefetch(cursor, 2 x
   batch)` then `batch(cursor, batch)`, for source 0 alone (data.path) and for the mixture of the
   three (weights 5:3:2, [[data.sources]]), both opened as `triaxis train` opens them
   (`open_train_data`). Local: memory-mapped shards. S3 cold: an empty cache, every shard
   downloaded on first use; S3 warm: the same loader again, every shard cached. Local and warm
   figures are the best of --repeats passes (local ones alternated between the two loaders).
3. The mixture's own arithmetic: `locate(i)` (sample -> source, index) per second.

moto on loopback has no network latency of its own; real S3 is slower per request. Not a test:
prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from data_loader import start_s3  # noqa: E402  (the same moto server as bench/data_loader.py)

WEIGHTS = (5, 3, 2)


def prepare_sources(tmp: Path, corpus_bytes: int, shard_tokens: int) -> list[tuple[str, str]]:
    """Three sources, [(local folder, s3 prefix)], from disjoint thirds of the embedded corpus."""
    import boto3

    from triaxis.data.prepare import PrepareOptions, prepare
    from triaxis.data.sources import embedded_corpus_files

    files = embedded_corpus_files()
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    out = []
    for s in range(3):
        local = tmp / f"src{s}"
        prepare(
            PrepareOptions(
                inputs=files[s::3],
                output=str(local),
                tokenizer="byte",
                max_bytes=corpus_bytes,
                shard_tokens=shard_tokens,
                workers=1,
            ),
            log=lambda *_: None,
        )
        for f in sorted(local.iterdir()):
            client.put_object(Bucket="bench", Key=f"src{s}/{f.name}", Body=f.read_bytes())
        out.append((str(local), f"s3://bench/src{s}"))
    return out


def open_data(paths: list[str], seq: int, cache_dir: Path):
    from triaxis.config import load_config
    from triaxis.data.mixture import open_train_data

    args = [f"--data.seq_len={seq}", f"--data.cache_dir={cache_dir}", "--data.cache_gib=4"]
    if len(paths) == 1:
        return open_train_data(load_config(None, [f"--data.path={paths[0]}", *args]))
    toml = cache_dir.parent / "mix.toml"
    toml.write_text(
        "".join(f'[[data.sources]]\npath = "{p}"\nweight = {w}\n' for p, w in zip(paths, WEIGHTS))
    )
    return open_train_data(load_config(str(toml), args))


def loader_rate(ds, steps: int, batch: int, seq: int) -> float:
    """Tokens/s of the trainer's calls, back to back."""
    t0 = time.perf_counter()
    for step in range(steps):
        cursor = step * batch
        ds.prefetch(cursor, 2 * batch)
        ds.batch(cursor, batch)
    return steps * batch * seq / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="samples per step")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--corpus-bytes", type=int, default=3_000_000, help="per source")
    ap.add_argument("--shard-tokens", type=int, default=500_000)
    ap.add_argument("--repeats", type=int, default=5, help="local timings: best of")
    a = ap.parse_args()

    import torch  # noqa: F401  (imported now: batch() would import it inside the first timing)

    tmp = Path(tempfile.mkdtemp(prefix="triaxis-bench-mix-"))
    server, _ = start_s3()
    try:
        srcs = prepare_sources(tmp, a.corpus_bytes, a.shard_tokens)
        local, remote = [p for p, _ in srcs], [p for _, p in srcs]
        rates: dict[str, float] = {"local single": 0.0, "local mixture": 0.0}
        local_ds = {"single": open_data(local[:1], a.seq, tmp / "cache")}
        local_ds["mixture"] = open_data(local, a.seq, tmp / "cache")
        for _ in range(a.repeats):  # alternated: a busy machine slows both alike
            for label, ds in local_ds.items():
                rate = loader_rate(ds, a.steps, a.batch, a.seq)
                rates[f"local {label}"] = max(rates[f"local {label}"], rate)
        cold_mib: dict[str, float] = {}  # downloaded by the cold pass
        for label, paths in (("single", remote[:1]), ("mixture", remote)):
            ds = open_data(paths, a.seq, tmp / "cache")
            rates[f"s3 cold {label}"] = loader_rate(ds, a.steps, a.batch, a.seq)
            caches = [d.cache for d in getattr(ds, "sources", [ds])]
            cold_mib[label] = sum(c.stats.downloaded_bytes for c in caches) / 2**20
            rates[f"s3 warm {label}"] = max(
                loader_rate(ds, a.steps, a.batch, a.seq) for _ in range(a.repeats)
            )
            ds.close()
        mix = local_ds["mixture"]
        n = 200_000
        t0 = time.perf_counter()
        for i in range(n):
            mix.locate(i)
        locate_per_s = n / (time.perf_counter() - t0)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"seq {a.seq}, batch {a.batch}, {a.steps} steps; mixture weights {WEIGHTS}")
    print(f"{'loader':<12} {'single tok/s':>14} {'mixture tok/s':>14} {'mixture/single':>15}")
    ratios = {}
    for where in ("local", "s3 cold", "s3 warm"):
        one, mix_rate = rates[f"{where} single"], rates[f"{where} mixture"]
        ratios[where] = mix_rate / one
        print(f"{where:<12} {one:>14,.0f} {mix_rate:>14,.0f} {ratios[where]:>15.2f}")
    print(
        f"s3 cold pass downloaded {cold_mib['single']:.1f} MiB (single), "
        f"{cold_mib['mixture']:.1f} MiB (mixture: the shards of three sources)"
    )
    print(f"mixture locate(i): {locate_per_s:,.0f} samples/s")
    summary = {"tokens_per_s": rates, "ratio": ratios, "cold_downloaded_mib": cold_mib}
    print(json.dumps({**summary, "locate_per_s": locate_per_s}))


if __name__ == "__main__":
    main()
