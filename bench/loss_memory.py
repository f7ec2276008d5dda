"""Peak memory and time of one forward + backward: the plain LM head + cross-entropy against the
fused, chunked one (train.loss_chunk_tokens), on a Llama-3-sized vocabulary.

    python bench/loss_memory.py [--device cpu|cuda] [--dim 512] [--layers 2] [--vocab 128256]
                                [--batch 4] [--seq 512] [--chunks 0 1024 4096]

Each chunk size runs in a fresh process (chunk 0 = the plain head). On CPU the peak is the
process's peak resident memory minus its resident memory before the step; on CUDA it is
torch.cuda.max_memory_allocated over the step minus what was allocated before it. Times are the
median of --repeats steps after one warm-up. Not a test: prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one(args: argparse.Namespace, chunk: int) -> dict:
    import dataclasses
    import resource

    import torch
    import torch.nn.functional as F

    from triaxis.model import PRESETS, Transformer

    dev = torch.device(args.device)
    margs = dataclasses.replace(
        PRESETS["tiny"],
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.dim // 64,
        n_kv_heads=max(1, args.dim // 256),
        ffn_dim=int(args.dim * 3.5) // 64 * 64,
        vocab_size=args.vocab,
        max_seq_len=args.seq,
        tie_embeddings=True,
    )
    with torch.device("meta"):
        model = Transformer(margs)
    model.materialize(dev)
    model.init_weights(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step() -> None:
        with autocast:
            if chunk:
                loss = model(tokens[:, :-1], targets=tokens[:, 1:], loss_chunk=chunk)
            else:
                logits = model(tokens[:, :-1])
        if not chunk:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: only the step varies

    step()  # warm-up; allocates the gradient buffers
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib() * 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "chunk": chunk,
        "step_s": statistics.median(times),
        "peak_gib": peak / 2**30,
        "tokens": args.batch * args.seq,
    }


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(one(args, args.child)))
        return
    rows = []
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    plain = next((r for r in rows if r["chunk"] == 0), None)
    print(
        f"{args.device}: dim {args.dim}, {args.layers} layers, vocab {args.vocab}, "
        f"{args.batch} x {args.seq} tokens"
    )
    print(f"{'loss':<16} {'step s':>8} {'peak GiB':>9} {'vs plain':>9}")
    for r in rows:
        name = "plain head" if r["chunk"] == 0 else f"fused, {r['chunk']} tok"
        rel = f"{r['peak_gib'] / plain['peak_gib']:.2f}x" if plain and plain["peak_gib"] else "-"
        print(f"{name:<16} {r['step_s']:>8.3f} {r['peak_gib']:>9.2f} {rel:>9}")
    print(json.dumps({"device": args.device, "rows": rows}))


if __name__ == "__main__":
    main()
