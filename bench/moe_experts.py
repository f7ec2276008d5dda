"""The MoE block's expert compute, forward + backward: triaxis's kernel choice
(`triaxis.model.moe.expert_swiglu`: torch._grouped_mm where torch has it) beside the plain
PyTorch way (a loop over experts slicing the sorted rows, which reads the group sizes on the
host), and the capped, padded batch (`Experts.padded`, capacity factor 1.25).

    python bench/moe_experts.py [--tokens 4096] [--dim 512] [--hidden 1024] [--experts 8]
                                [--k 2] [--repeats 7]

Process CPU time per step (median of --repeats after one warm-up), then the ratios. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    torch.manual_seed(0)
    from triaxis.model.moe import Experts, expert_swiglu

    ex = Experts(a.experts, a.dim, a.hidden)
    for w in ex.parameters():
        torch.nn.init.normal_(w, std=0.02)
    rows = a.tokens * a.k
    expert = torch.randint(0, a.experts, (rows,)).sort().values
    counts = torch.bincount(expert, minlength=a.experts)
    ends = counts.cumsum(0).to(torch.int32)
    x = torch.randn(rows, a.dim, requires_grad=True)
    capacity = math.ceil(1.25 * rows / a.experts)
    xp = torch.randn(a.experts, capacity, a.dim, requires_grad=True)

    def grouped():
        expert_swiglu(x, ends, ex.w1, ex.w3, ex.w2).square().mean().backward()

    def plain_loop():
        out, start = [], 0
        for e, end in enumerate(ends.tolist()):
            xe = x[start:end]
            out.append((F.silu(xe @ ex.w1[e]) * (xe @ ex.w3[e])) @ ex.w2[e])
            start = end
        torch.cat(out).square().mean().backward()

    def padded():
        ex.padded(xp).square().mean().backward()

    times = {}
    for name, fn in (("plain_loop", plain_loop), ("grouped", grouped), ("padded_cf1.25", padded)):
        fn()
        samples = []
        for _ in range(a.repeats):
            t = time.process_time()
            fn()
            samples.append(time.process_time() - t)
        times[name] = statistics.median(samples)
    for name, t in times.items():
        print(f"{name:14s} {t * 1e3:8.1f} ms CPU   x{t / times['plain_loop']:.2f} of the loop")
    print(json.dumps({"args": vars(a), "cpu_s": times, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
