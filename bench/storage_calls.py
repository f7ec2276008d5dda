"""Latency of one small S3 operation through triaxis.storage, against building a client per call
(what storage.py did before it kept one client per process and AWS settings).

    python bench/storage_calls.py [--calls 30]

Starts moto's S3 server on loopback, then times `exists` and a 1 KB `write_bytes` through
triaxis.storage (a cached client) and the same operations on a fresh s3fs client per call.
Checkpoint commits, sidecars, retention, verification and the data loader's shard fetches are
all such calls. moto on loopback has no network latency: on real S3 each request adds tens of
ms to both columns, and the client set-up (credential chain, instance metadata) costs more.
Not a test: prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.s3_server import serve_for_this_process  # moto on loopback, env pointed at it


def per_call_ms(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=30)
    calls = ap.parse_args().calls
    server, _ = serve_for_this_process()
    import boto3
    import s3fs

    from triaxis import storage

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    storage.write_bytes("s3://bench/x", b"x" * 1024)

    def fresh():
        return s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    rows = {
        "exists": (
            per_call_ms(lambda i: storage.exists("s3://bench/x"), calls),
            per_call_ms(lambda i: fresh().exists("bench/x"), calls),
        ),
        "write 1 KB": (
            per_call_ms(lambda i: storage.write_bytes(f"s3://bench/a{i}", b"a" * 1024), calls),
            per_call_ms(lambda i: fresh().pipe_file(f"bench/b{i}", b"b" * 1024), calls),
        ),
    }
    server.stop()
    print(f"{'operation':<12} {'cached client ms':>17} {'client per call ms':>19} {'ratio':>6}")
    for op, (cached, per_call) in rows.items():
        print(f"{op:<12} {cached:>17.1f} {per_call:>19.1f} {per_call / cached:>6.1f}")
    print(
        json.dumps(
            {
                op: {"cached_ms": round(c, 2), "client_per_call_ms": round(p, 2)}
                for op, (c, p) in rows.items()
            }
        )
    )


if __name__ == "__main__":
    main()
