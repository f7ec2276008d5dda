"""Two checks of the GPU session (bench/gpu_session.py), each ending with one `ROW {json}` line.

    python bench/gpu_parts.py plan-check --rows OUT/rows.jsonl [--preset 1b] [--seq 2048]
                                         [--micro-batch 8]
    python bench/gpu_parts.py flex [--device cuda]
    python bench/gpu_parts.py cp [--device cuda]

plan-check: the planner's peak memory for the speed runs' own layout (one GPU, no activation
checkpointing, the trainer's defaults) against what those runs measured
(torch.cuda.max_memory_allocated since the reset after warm-up); within 15% passes.
flex: compiled FlexAttention with a document mask (what training runs on CUDA) against SDPA
with the dense block-diagonal mask, bf16, forward and backward, both against an fp32 reference
of the dense path; flex passes when its error is within twice SDPA's (+1e-3), i.e. no worse
than bf16 rounding explains. Also the median time of each, forward + backward.
cp: ring attention (cp=1 on one device: every block kernel, the log-sum-exp merge and the ring's
own backward, no communication) with the fused kernels triaxis.parallel.cp_kernel picks (CUDA:
flash for the causal and fully visible blocks, memory-efficient for document-masked ones)
against the same ring forced onto the math kernel and plain SDPA over the whole sequence, plain
causal and with documents; bf16 forward + backward: median time, peak memory above the inputs,
error against fp32 SDPA. Passes when the fused ring's error is within twice SDPA's (+1e-3) and
it holds less memory than the math kernel (CUDA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def plan_check(a: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from plan_gpu_memory import predicted_gib

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    profile = "h200" if "H200" in gpu else "h100"  # the prediction is the same for both
    layout = argparse.Namespace(
        preset=a.preset, seq=a.seq, micro_batch=a.micro_batch, dp_replicate=1, dp_shard=1,
        tp=1, ac="none", ac_every=2,
    )  # fmt: skip
    predicted, parts = predicted_gib(layout, profile)
    shares = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
    print(f"predicted peak {predicted:.2f} GiB: {shares}")
    rows_file = Path(a.rows)
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()] if rows_file.exists() else []
    measured = {r["part"]: r for r in rows if r.get("ok") and r.get("peak_mem_gib")}
    checks = []
    for part in ("triaxis-compiled", "triaxis-eager"):
        if part not in measured:
            continue
        got = measured[part]["peak_mem_gib"]
        ratio = predicted / got
        verdict = "PASS" if abs(ratio - 1) <= 0.15 else "FAIL"
        if measured[part].get("device") == "cpu":
            verdict = "n/a on cpu (resident set, not the allocator)"
        checks.append(
            f"planner peak vs max_memory_allocated ({part}: {a.preset}, batch {a.micro_batch} x "
            f"{a.seq}, ac none): predicted {predicted:.2f} GiB, measured {got:.2f} GiB, "
            f"predicted/measured {ratio:.3f}: {verdict} (within 15%)"
        )
    if not checks:
        raise SystemExit("no triaxis speed row with a peak memory in the rows: nothing to check")
    return {"predicted_gib": predicted, "checks": checks}


def flex(a: argparse.Namespace) -> dict:
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from triaxis.model.attention import attend, document_ids, document_mask

    dev = torch.device(a.device)
    # The 1b preset's attention (32 heads over 8 KV heads of 64) on CUDA; small on the CPU.
    cuda = dev.type == "cuda"
    B, H, KV, T, hd, doc = (2, 32, 8, 2048, 64, 256) if cuda else (2, 4, 2, 128, 16, 32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (B, T), generator=g)
    tokens[torch.rand(B, T, generator=g) < 1.0 / doc] = 0  # EOS ends each document
    doc_ids = document_ids(tokens.to(dev), 0)
    q = torch.randn(B, H, T, hd, generator=g).to(dev)
    k, v = (torch.randn(B, KV, T, hd, generator=g).to(dev) for _ in range(2))
    grad_out = torch.randn(B, H, T, hd, generator=g).to(dev)
    dense, block = document_mask(doc_ids, "sdpa"), document_mask(doc_ids, "flex")

    backward = cuda  # FlexAttention has no backward on CPU: the dry run checks the forward

    def run(mask, dtype):
        leaves = [t.to(dtype).requires_grad_(backward) for t in (q, k, v)]
        if backward or isinstance(mask, torch.Tensor):
            out = attend(*leaves, mask, gqa=True)
        else:  # eager on CPU: inductor's CPU compile of flex outlasts a dry run's deadline
            out = flex_attention(*leaves, block_mask=mask, enable_gqa=True)
        if not backward:
            return [out.detach().float()]
        out.backward(grad_out.to(dtype))
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    ref = run(dense, torch.float32)

    def errors(got) -> list[float]:
        return [float((x - r).norm() / r.norm()) for x, r in zip(got, ref)]

    err_flex, err_sdpa = errors(run(block, torch.bfloat16)), errors(run(dense, torch.bfloat16))

    def seconds(mask) -> float:
        times = []
        for _ in range(7):  # the first two: compile and warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(mask, torch.bfloat16)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])

    t_flex, t_sdpa = seconds(block), seconds(dense)
    names = ("out", "dq", "dk", "dv")
    worst = max(f - 2 * s for f, s in zip(err_flex, err_sdpa))
    verdict = "PASS" if worst <= 1e-3 else "FAIL"
    check = (
        f"flex ({'compiled' if backward else 'eager'}, BlockMask) vs SDPA dense document mask, "
        f"bf16 {'fwd+bwd' if backward else 'fwd only'}, {B}x{T} tokens "
        f"with {int((tokens == 0).sum())} EOS: rel. error vs fp32 flex/sdpa "
        + ", ".join(f"{n} {f:.1e}/{s:.1e}" for n, f, s in zip(names, err_flex, err_sdpa))
        + f"; {verdict} (flex within 2x sdpa + 1e-3); time flex {t_flex * 1e3:.2f} ms, "
        f"sdpa dense {t_sdpa * 1e3:.2f} ms"
    )
    return {
        "err_flex": dict(zip(names, err_flex)),  # zip: the forward only on CPU
        "err_sdpa": dict(zip(names, err_sdpa)),
        "flex_s": t_flex,
        "sdpa_dense_s": t_sdpa,
        "checks": [check],
    }


@contextmanager
def _kernel_family(family: str | None):
    """Force ring attention's kernel family ("math"), or leave the choice alone (None)."""
    from triaxis.parallel import cp_kernel

    real = cp_kernel.kernel_name
    if family is not None:
        cp_kernel.kernel_name = lambda device: family
    try:
        yield
    finally:
        cp_kernel.kernel_name = real


def cp(a: argparse.Namespace) -> dict:
    import torch

    from triaxis.model.attention import attend, document_ids, document_mask
    from triaxis.parallel import cp_kernel
    from triaxis.parallel.ring_attention import build_plan, ring_attention

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    # The 1b preset's attention (32 heads over 8 KV heads of 64) at 8K tokens on CUDA.
    B, H, KV, T, hd, doc = (1, 32, 8, 8192, 64, 1024) if cuda else (1, 4, 2, 256, 16, 32)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (B, T), generator=g)
    tokens[torch.rand(B, T, generator=g) < 1.0 / doc] = 0  # EOS ends each document
    q = torch.randn(B, H, T, hd, generator=g).to(dev)
    k, v = (torch.randn(B, KV, T, hd, generator=g).to(dev) for _ in range(2))
    dy = torch.randn(B, H, T, hd, generator=g).to(dev)

    def run(kernel: str, ids, dt) -> list:
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        if kernel == "sdpa":
            out = attend(*leaves, None if ids is None else document_mask(ids, "sdpa"), gqa=True)
        else:
            with _kernel_family("math" if kernel == "math" else None):
                out = ring_attention(*leaves, build_plan(1, 0, T, ids))
                out.backward(dy.to(dt))
        if kernel == "sdpa":
            out.backward(dy.to(dt))
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    def measure(kernel: str, ids) -> tuple[float, float | None, list]:
        times, peak = [], None
        for _ in range(7 if cuda else 4):  # the first two: warm-up
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            got = run(kernel, ids, dtype)
            if cuda:
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:]), peak, got

    names, rows, checks = ("out", "dq", "dk", "dv"), {}, []
    for mode in ("causal", "docs"):
        ids = document_ids(tokens.to(dev), 0) if mode == "docs" else None
        plan = build_plan(1, 0, T, ids)
        q_block = q[:, :, : T // 2].to(dtype)  # one chunk of queries: what each block sees
        tasks = [t for step in plan.steps for t in step]
        chosen = sorted(
            {"{} ({})".format(*cp_kernel.choose(q_block, t.mask, t.causal)) for t in tasks}
        )
        ref = run("sdpa", ids, torch.float32)
        got = {kernel: measure(kernel, ids) for kernel in ("fused", "math", "sdpa")}
        err = {kernel: [float((x - r).norm() / r.norm()) for x, r in zip(got[kernel][2], ref)]
               for kernel in got}  # fmt: skip
        worst = max(f - 2 * s for f, s in zip(err["fused"], err["sdpa"]))
        fused_gib, math_gib = got["fused"][1], got["math"][1]
        ok = worst <= 1e-3 and (not cuda or fused_gib < math_gib)
        rows[mode] = {kernel: {"s": s, "peak_gib": gib, "err": dict(zip(names, err[kernel]))}
                      for kernel, (s, gib, _) in got.items()}  # fmt: skip
        rows[mode]["kernels"] = chosen

        def fmt(kernel: str) -> str:
            s, gib, _ = got[kernel]
            return f"{kernel} {s * 1e3:.2f} ms" + (f" {gib:.2f} GiB" if gib is not None else "")

        checks.append(
            f"cp ring kernels ({mode}, {str(dtype).removeprefix('torch.')} fwd+bwd, {B}x{T} "
            f"tokens, {H}/{KV} heads of {hd}, cp=1): blocks ran {'; '.join(chosen)}; "
            + ", ".join(fmt(kernel) for kernel in got)
            + "; rel. error vs fp32 fused/sdpa "
            + ", ".join(f"{n} {f:.1e}/{s:.1e}" for n, f, s in zip(names, err["fused"], err["sdpa"]))
            + f"; {'PASS' if ok else 'FAIL'} (fused within 2x sdpa + 1e-3"
            + (", less memory than math)" if cuda else ")")
        )
    return {**rows, "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pc = sub.add_parser("plan-check")
    pc.add_argument("--rows", required=True)
    pc.add_argument("--preset", default="1b")
    pc.add_argument("--seq", type=int, default=2048)
    pc.add_argument("--micro-batch", type=int, default=8)
    fx = sub.add_parser("flex")
    fx.add_argument("--device", default="cuda")
    ring = sub.add_parser("cp")
    ring.add_argument("--device", default="cuda")
    a = ap.parse_args()
    row = {"plan-check": plan_check, "flex": flex, "cp": cp}[a.cmd](a)
    for check in row["checks"]:
        print("CHECK " + check)
    print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
