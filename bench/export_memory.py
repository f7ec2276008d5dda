"""Peak resident memory of `triaxis export-hf` against the plain-PyTorch way (the whole model
loaded from the checkpoint, then `safetensors.torch.save_file`), on the same checkpoint.

    python bench/export_memory.py [--dim 1024] [--layers 8] [--vocab 32000]

Each export runs in a fresh process that reports its peak RSS (VmHWM) above its RSS just before
the export (imports and allocator warm-up excluded); printed against the model's fp32 size and
its largest tensor. Counted bytes, not time: the figure holds under load. Not a test.
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


def child(how: str, ckpt: str, out: str, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    from triaxis.checkpoint.inference import load_checkpoint_model
    from triaxis.hf.exporter import export_hf

    torch.empty(1).add_(1)  # the allocator and kernels, before the baseline
    base = _rss_kib("VmRSS")
    if how == "triaxis":
        export_hf(ckpt, out, dtype=dtype, log=lambda _: None)
    else:
        model, _ = load_checkpoint_model(ckpt)
        want = torch.bfloat16 if dtype == "bf16" else torch.float32
        sd = {n: p.detach().to(want).contiguous() for n, p in model.named_parameters()}
        Path(out).mkdir()
        save_file(sd, f"{out}/model.safetensors")
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - base) / 1024}))


def random_checkpoint(folder: str, dim: int, layers: int, vocab: int) -> tuple[float, float]:
    """A random Llama-shaped model saved as a triaxis checkpoint (as import-hf writes one);
    returns (its fp32 MiB, its largest tensor's MiB). Shared by bench/hf_run_output.py."""
    import torch

    from triaxis.hf.importer import save_checkpoint
    from triaxis.model import ModelArgs, Transformer

    args = ModelArgs(
        dim=dim,
        n_layers=layers,
        n_heads=dim // 64,
        n_kv_heads=dim // 128,
        ffn_dim=dim * 4,
        vocab_size=vocab,
        max_seq_len=256,
    )
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize("cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    sizes = [p.numel() * 4 for p in model.parameters()]
    save_checkpoint(model, folder, source="bench")
    return sum(sizes) / 2**20, max(sizes) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    with tempfile.TemporaryDirectory() as tmp:
        model_mib, largest_mib = random_checkpoint(f"{tmp}/ckpt", a.dim, a.layers, a.vocab)
        rows = []
        for dtype in ("fp32", "bf16"):
            for how in ("plain", "triaxis"):
                out = f"{tmp}/{how}-{dtype}"
                cmd = [sys.executable, __file__, "--child", how, f"{tmp}/ckpt", out, dtype]
                got = json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                    .stdout.strip()
                    .splitlines()[-1]
                )
                rows.append((dtype, how, got["peak_mib"]))
    print(f"model {model_mib:.0f} MiB fp32, largest tensor {largest_mib:.0f} MiB")
    print(f"{'dtype':>5}  {'export':>8}  {'peak MiB':>9}  {'x model':>7}  {'x largest':>9}")
    for dtype, how, peak in rows:
        print(
            f"{dtype:>5}  {how:>8}  {peak:>9.0f}  {peak / model_mib:>7.2f}  "
            f"{peak / largest_mib:>9.2f}"
        )
    plain = {d: p for d, h, p in rows if h == "plain"}
    ratio = {d: round(p / plain[d], 3) for d, h, p in rows if h == "triaxis"}
    print(
        json.dumps({"model_mib": model_mib, "largest_mib": largest_mib, "triaxis_vs_plain": ratio})
    )


if __name__ == "__main__":
    main()
