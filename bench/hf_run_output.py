"""Peak resident memory per rank of the run's own Hugging Face write (`checkpoint.hf`) at world
4, against the plain-PyTorch way (one rank loads the whole model, `safetensors.torch.save_file`).

    python bench/hf_run_output.py [--dim 1024] [--layers 8] [--vocab 32000] [--world 4]

Each rank is a fresh process that runs `write_rank_share` (its shards, streamed one tensor at a
time from the checkpoint) and reports its peak RSS (VmHWM, reset through /proc/self/clear_refs)
above its RSS just before, with the weight bytes it wrote. The share needs no collective, so the
ranks run without a process group. Counted bytes, not time: the figure holds under load. Not a
test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(how: str, ckpt: str, out: str, rank: str, world: str) -> None:
    import torch
    from safetensors.torch import save_file

    from triaxis.checkpoint.inference import load_checkpoint_model
    from triaxis.hf.run_output import write_rank_share

    torch.empty(1).add_(1)  # the allocator and kernels, before the baseline
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    Path(out).mkdir(exist_ok=True)
    if how == "triaxis":
        wrote = write_rank_share(ckpt, Path(out), "bf16", int(rank), int(world))
    else:
        model, _ = load_checkpoint_model(ckpt)
        sd = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.named_parameters()}
        save_file(sd, f"{out}/model.safetensors")
        wrote = sum(t.numel() * 2 for t in sd.values())
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - base) / 1024, "wrote": wrote}))


def _run(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    from concurrent.futures import ThreadPoolExecutor

    from export_memory import random_checkpoint  # bench/ is this script's own folder

    with tempfile.TemporaryDirectory() as tmp:
        model_mib, largest_mib = random_checkpoint(f"{tmp}/ckpt", a.dim, a.layers, a.vocab)
        plain = _run("plain", f"{tmp}/ckpt", f"{tmp}/plain", "0", "1")
        with ThreadPoolExecutor(a.world) as pool:  # the ranks at once, as in a run
            ranks = list(
                pool.map(
                    lambda r: _run("triaxis", f"{tmp}/ckpt", f"{tmp}/hf", str(r), str(a.world)),
                    range(a.world),
                )
            )
    print(f"model {model_mib:.0f} MiB fp32, largest tensor {largest_mib:.0f} MiB; bf16 output")
    print(f"{'writer':>10}  {'wrote MiB':>9}  {'peak MiB':>9}  {'x model':>7}  {'x largest':>9}")
    rows = [("plain r0", plain)] + [(f"rank {r}", got) for r, got in enumerate(ranks)]
    for who, got in rows:
        peak = got["peak_mib"]
        print(
            f"{who:>10}  {got['wrote'] / 2**20:>9.0f}  {peak:>9.0f}  {peak / model_mib:>7.2f}  "
            f"{peak / largest_mib:>9.2f}"
        )
    worst = max(g["peak_mib"] for g in ranks)
    print(json.dumps({"model_mib": model_mib, "worst_rank_vs_plain": worst / plain["peak_mib"]}))


if __name__ == "__main__":
    main()
