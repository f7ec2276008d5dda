"""Expert parallelism on CPU: one MoE block's forward + backward per rank at ep=2 (world 2, each
rank holds half the experts, tokens moved by all-to-all: triaxis.parallel.expert) beside the
plain PyTorch way at ep=1 (every rank holds every expert: the single-device block), on the same
tokens; the all-to-all bytes counted against the prediction.

    python bench/moe_ep.py [--tokens 2048] [--dim 256] [--hidden 512] [--experts 8] [--k 2]
                           [--repeats 5]

Process CPU time per step (median of --repeats after one warm-up). Predicted bytes per rank and
step (dropless), forward and again backward: the rows this rank routes to the other rank's experts
plus the rows it computes for the other rank and sends back, x dim x 4 bytes, and, once, the
off-rank half of the per-expert counts (experts / 2 x 8 bytes); and the planner's figure
(triaxis.plan.experts.all_to_all_bytes: uniform routing, no counts) with the counted / planner
ratio. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dist import run_workers  # noqa: E402


def _worker(rank, world, a):
    from torch.distributed.device_mesh import init_device_mesh

    from triaxis.model import PRESETS
    from triaxis.model.moe import MoE
    from triaxis.parallel.expert import apply_ep

    args = dataclasses.replace(
        PRESETS["tiny-moe"], dim=a.dim, moe_ffn_dim=a.hidden, n_experts=a.experts, moe_top_k=a.k
    )
    args = dataclasses.replace(args, n_shared_experts=0)
    torch.manual_seed(0)
    plain = MoE(args)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ep = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    with torch.device("meta"):
        sharded = MoE(args)
    apply_ep(torch.nn.ModuleDict({"ffn": sharded}), ep["ep"])
    sharded.to_empty(device="cpu")
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for (_, p), (_, q) in zip(sharded.named_parameters(), plain.named_parameters()):
            src = distribute_tensor(q, p.device_mesh, p.placements) if hasattr(p, "to_local") else q
            p.copy_(src)
        for b, c in zip(sharded.buffers(), plain.buffers()):  # the routing bias (zeros)
            b.copy_(c)
    torch.manual_seed(1 + rank)
    # As in training, the block's input needs its gradient (else the dispatch's backward is
    # skipped).
    x = torch.randn(1, a.tokens, a.dim, requires_grad=True)
    sent = [0]
    orig = dist.all_to_all_single

    def counting(out, inp, out_splits=None, in_splits=None, group=None):
        # Bytes that leave this rank: all but the block it sends to itself.
        row = inp[0].numel() * inp.element_size() if inp.numel() else 0
        mine = in_splits[rank] if in_splits is not None else inp.shape[0] // world
        sent[0] += (inp.shape[0] - mine) * row
        return orig(out, inp, out_splits, in_splits, group=group)

    def step(m):
        m(x).sum().backward()

    results = {}
    for name, m in (("plain ep=1", plain), ("triaxis ep=2", sharded)):
        dist.all_to_all_single = counting
        sent[0] = 0
        step(m)
        bytes_per_step = sent[0]
        times = []
        for _ in range(a.repeats):
            t0 = time.process_time()
            step(m)
            times.append(time.process_time() - t0)
        dist.all_to_all_single = orig
        results[name] = (statistics.median(times) * 1e3, bytes_per_step)
    # Rows this rank sends to the other rank's experts, and the rows it gets from there (whose
    # results it sends back), forward and again backward; the counts' off-rank half.
    chosen = plain.router(x.view(-1, a.dim))[1].flatten()
    off = torch.tensor([int((chosen // (a.experts // world) != rank).sum())])
    both = [torch.zeros_like(off) for _ in range(world)]
    dist.all_gather(both, off)
    rows = int(sum(both))
    results["predicted"] = 2 * rows * a.dim * 4 + (a.experts // world) * 8
    results["planner"] = planner_bytes(args, a.tokens, world)
    return results


def planner_bytes(args, tokens: int, ep: int) -> float:
    """What `triaxis plan` prices for this block and step (uniform routing, fp32 on CPU): four
    all-to-alls (dispatch and combine, forward and backward) of plan.experts.all_to_all_bytes."""
    from triaxis.plan.experts import all_to_all_bytes
    from triaxis.plan.hardware import load_catalog, resolve_hardware
    from triaxis.plan.problem import Layout, Problem, shape_from_args
    from triaxis.plan.runtimes import RUNTIMES

    hw = resolve_hardware(load_catalog(), "cpu", None, ep)
    p = Problem(shape_from_args(args, "bench"), hw, RUNTIMES["triaxis"], tokens, ep)
    return 4 * all_to_all_bytes(p, Layout(1, ep, 1, 1, 1, ep=ep))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    out = run_workers(_worker, 2, a)
    for rank, r in enumerate(out):
        (pm, pb), (tm, tb) = r["plain ep=1"], r["triaxis ep=2"]
        print(
            f"rank {rank}: plain ep=1 {pm:.0f} CPU ms (all-to-all {pb} B) | triaxis ep=2 "
            f"{tm:.0f} CPU ms, ratio {tm / pm:.2f}, all-to-all {tb} B vs predicted "
            f"{r['predicted']} B (this routing) | planner {r['planner']:.0f} B (uniform "
            f"routing), counted / planner {tb / r['planner']:.3f}"
        )


if __name__ == "__main__":
    main()
