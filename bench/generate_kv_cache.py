"""Per-token generation time with the KV cache (triaxis/generate.py) against the uncached path,
in the same run, at growing lengths.

    python bench/generate_kv_cache.py [--device cpu|cuda] [--dim 256] [--layers 4]
                                      [--lengths 64,128,256,512,1024] [--repeats 7]

At each length L: the cached step (a cache holding L tokens, one new token through
`cached_forward`) and the uncached step (what `generate(..., use_cache=False)` and the
pre-cache `triaxis generate` run: the model's plain forward over all L + 1 tokens, the last
position's logits kept). Median of --repeats steps after one warm-up, the two taking turns;
CPU time of this process on CPU (the machine is shared: wall time is noisy), wall time on CUDA
(synchronized). Flat means the cached column stays level while L grows; the ratio column is
uncached / cached. Not a test: prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", default="64,128,256,512,1024")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import torch

    from triaxis.generate import KVCache, cached_forward
    from triaxis.model import ModelArgs, Transformer

    lengths = [int(x) for x in args.lengths.split(",")]
    if args.device == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: no time spent spinning under load
    device = torch.device(args.device)
    margs = ModelArgs(
        dim=args.dim,
        n_layers=args.layers,
        n_heads=max(1, args.dim // 64),
        n_kv_heads=max(1, args.dim // 128),
        ffn_dim=args.dim * 4,
        vocab_size=8192,
        max_seq_len=max(lengths) + args.repeats + 2,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(margs)
    model.materialize(device)
    model.init_weights(0)
    model.eval()
    cuda = device.type == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    rows = []
    with torch.no_grad():
        for length in lengths:
            tokens = torch.randint(
                0, margs.vocab_size, (1, length + args.repeats + 2), device=device
            )
            cache = KVCache(model)
            cached_forward(model, tokens[:, :length], cache)  # prefill, not timed
            cached, uncached = [], []
            for r in range(args.repeats + 1):
                t0 = clock()
                cached_forward(model, tokens[:, length + r : length + r + 1], cache)
                t1 = clock()
                model(tokens[:, : length + 1])[:, -1, :]
                t2 = clock()
                if r:  # the first is a warm-up
                    cached.append(t1 - t0)
                    uncached.append(t2 - t1)
            c, u = statistics.median(cached) * 1e3, statistics.median(uncached) * 1e3
            rows.append({"length": length, "cached_ms": c, "uncached_ms": u, "ratio": u / c})

    unit = "wall" if cuda else "CPU"
    print(f"per-token {unit} time, dim {args.dim}, {args.layers} layers, {args.device}")
    print(f"{'length':>8} {'cached ms':>10} {'uncached ms':>12} {'uncached/cached':>16}")
    for r in rows:
        print(
            f"{r['length']:>8} {r['cached_ms']:>10.2f} {r['uncached_ms']:>12.2f} "
            f"{r['ratio']:>16.1f}"
        )
    flat = rows[-1]["cached_ms"] / rows[0]["cached_ms"]
    grow = rows[-1]["uncached_ms"] / rows[0]["uncached_ms"]
    span = f"{rows[-1]['length']} / {rows[0]['length']} tokens"
    print(f"cached: x{flat:.2f} from {span}; uncached: x{grow:.1f}")
    print(json.dumps({"bench": "generate_kv_cache", "device": args.device, "rows": rows}))


if __name__ == "__main__":
    main()
