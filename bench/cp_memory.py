"""Context parallelism on CPU: activation memory per rank against sequence length, and the
ring's exposed communication against an all-gather-K/V attention written in plain PyTorch.

    python bench/cp_memory.py [--seqs 1024 2048 4096] [--cps 1 2 4] [--attn-seq 4096]

Part 1 (memory): the triaxis model (dim 256, 4 layers, GQA 8/4 heads) runs one forward on each
cp rank's head-tail shard; the figure is the largest rank's bytes kept from forward to backward
(every storage forward creates that is still alive when it returns, the weights' own
excluded: a counted quantity, not a timing), beside the same model in one process (cp=1,
plain SDPA: the plain-PyTorch run).

Part 2 (communication): attention alone, q (1, 16, T/cp, 64), k/v (1, 8, T/cp, 64), forward +
backward. Ring: triaxis.parallel.ring_attention; exposed time is what the rank spends blocked
in the ring's waits (the transfer not hidden behind the block being computed). All-gather:
gather K/V from every rank, one SDPA over the whole keys, reduce-scatter dK/dV; its
collectives block, so they are all exposed. Also the bytes each rank receives and the K/V it
holds at the peak. Medians of --repeat after one warm-up; the load average is printed.
Not a test: prints tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dist import run_workers  # noqa: E402
from tests.test_activation_memory import KeptBytes  # noqa: E402
from triaxis.model.args import ModelArgs  # noqa: E402
from triaxis.model.llama import Transformer  # noqa: E402
from triaxis.parallel import ring_attention as ring  # noqa: E402
from triaxis.parallel.compat import reduce_scatter_single  # noqa: E402
from triaxis.parallel.context import ContextParallel  # noqa: E402
from triaxis.parallel.cp_shard import head_tail_positions, shard_head_tail  # noqa: E402


def _args(seq: int) -> ModelArgs:
    return ModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=768,
        vocab_size=512,
        max_seq_len=seq,
    )


def kept_bytes(rank: int, world: int, seq: int) -> int:
    """Bytes this rank keeps from forward to backward for its shard of one sequence."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(_args(seq))
    model.materialize("cpu")
    model.init_weights(seed=0)
    tokens = torch.randint(0, 512, (1, seq))
    if world > 1:
        model.context_parallel = ContextParallel(dist.group.WORLD)
        tokens = shard_head_tail(tokens, world, rank)
    with KeptBytes() as kept:
        loss = model(tokens).float().square().mean()
    # Views of the weights (a linear's transpose) share their storage: not activations.
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights.add(loss.untyped_storage().data_ptr())
    held = sum(n for ptr, (ref, n) in kept.made.items() if not ref.expired() and ptr not in weights)
    loss.backward()  # the ring's backward is collective: every rank runs it
    return held


def _single(seq: int) -> int:
    return kept_bytes(0, 1, seq)


class _Timed:
    """Seconds spent blocked in communication waits."""

    def __init__(self):
        self.s = 0.0

    def __call__(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.s += time.perf_counter() - t0
        return out


def _qkv(rank: int, cp: int, seq: int):
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(1, 16, seq // cp, 64, generator=g, requires_grad=True)
    k = torch.randn(1, 8, seq // cp, 64, generator=g, requires_grad=True)
    v = torch.randn(1, 8, seq // cp, 64, generator=g, requires_grad=True)
    return q, k, v


def ring_step(rank: int, cp: int, seq: int, timer: _Timed) -> None:
    q, k, v = _qkv(rank, cp, seq)
    plan = ring.build_plan(cp, rank, seq // cp, None, dist.group.WORLD)
    ring.ring_attention(q, k, v, plan).sum().backward()


def allgather_step(rank: int, cp: int, seq: int, timer: _Timed) -> None:
    q, k, v = _qkv(rank, cp, seq)
    kv = torch.stack([k, v]).detach()
    parts = [torch.empty_like(kv) for _ in range(cp)]
    timer(dist.all_gather, parts, kv)  # O(T) K/V on every rank
    order = [head_tail_positions(seq, cp, r) for r in range(cp)]
    whole = torch.empty(2, 1, 8, seq, 64)
    for r, part in enumerate(parts):
        whole[:, :, :, order[r]] = part
    whole.requires_grad_(True)
    qpos = head_tail_positions(seq, cp, rank)
    mask = qpos[:, None] >= torch.arange(seq)[None, :]
    y = F.scaled_dot_product_attention(q, whole[0], whole[1], attn_mask=mask, enable_gqa=True)
    y.sum().backward()
    grads = [whole.grad[:, :, :, order[r]].contiguous() for r in range(cp)]
    mine = torch.empty_like(kv)
    timer(reduce_scatter_single, mine, torch.cat(grads))  # dK/dV back to their owners


def comm_worker(rank: int, world: int, seq: int, repeat: int) -> dict:
    out = {}
    for name, step in (("ring", ring_step), ("all-gather", allgather_step)):
        totals, exposed = [], []
        for i in range(repeat + 1):
            timer = _Timed()
            original = ring._Ring.wait
            ring._Ring.wait = lambda self, o=original, t=timer: t(o, self)
            try:
                dist.barrier()
                t0 = time.perf_counter()
                step(rank, world, seq, timer)
                total = time.perf_counter() - t0
            finally:
                ring._Ring.wait = original
            if i:  # the first is a warm-up
                totals.append(total)
                exposed.append(timer.s)
        out[name] = (statistics.median(totals), statistics.median(exposed))
    return out


def kv_bytes(seq: int, cp: int) -> float:
    return 2 * 8 * (seq // cp) * 64 * 4  # K and V, fp32, of one rank's tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--attn-seq", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("activation memory kept for backward, MiB per rank (largest rank)")
    print(f"{'seq':>6} " + " ".join(f"{'cp=' + str(c):>10}" for c in a.cps) + "   ratio to cp=1")
    for seq in a.seqs:
        row = []
        for cp in a.cps:
            got = [_single(seq)] if cp == 1 else run_workers(kept_bytes, cp, seq)
            row.append(max(got) / 2**20)
        ratios = " ".join(f"{r / row[0]:.2f}" for r in row)
        print(f"{seq:>6} " + " ".join(f"{r:>10.1f}" for r in row) + f"   {ratios}")
    print(f"\nattention alone at seq {a.attn_seq}, forward + backward, medians of {a.repeat}")
    print(
        f"{'cp':>3} {'variant':>11} {'step s':>8} {'exposed s':>10} "
        f"{'recv MiB':>9} {'peak K/V MiB':>13}"
    )
    for cp in (c for c in a.cps if c > 1):
        res = run_workers(comm_worker, cp, a.attn_seq, a.repeat)
        kv = kv_bytes(a.attn_seq, cp) / 2**20
        moved = {  # received per rank: forward K/V, backward K/V and the dK/dV accumulators
            "ring": (cp - 1) * kv + (cp - 1) * kv + cp * kv,
            "all-gather": (cp - 1) * kv + (cp - 1) * kv,
        }
        held = {"ring": 2 * kv, "all-gather": cp * kv}  # own + in flight, or every rank's
        for name in ("ring", "all-gather"):
            step = max(r[name][0] for r in res)
            exposed = max(r[name][1] for r in res)
            print(
                f"{cp:>3} {name:>11} {step:>8.3f} {exposed:>10.3f} "
                f"{moved[name]:>9.1f} {held[name]:>13.1f}"
            )
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
