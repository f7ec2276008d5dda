"""triaxis vs the Hugging Face baseline on one GPU, measured side by side in one invocation.

    python bench/gpu_speed.py [--baseline ../shared/bench/hf_llama_baseline.py] [--steps 20]

Runs triaxis's `1b` preset (Llama-3.2-1B shape, bf16 autocast over fp32 master weights, fused
AdamW, synthetic tokens, batch 8 x seq 2048) through the real `triaxis train`, then the peer
baseline eager and with --compile. Prints one table (tokens/s, MFU, peak memory, ratios) and
writes JSON (--out). MFU: 6·(non-embedding params + LM head) + 12·layers·d·seq FLOPs per token
over the card's dense bf16 peak. Needs a CUDA GPU (and `transformers` for the baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run_triaxis(
    preset: str, steps: int, batch: int, seq: int, compile_: bool, device: str, extra: list[str]
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "triaxis",
            "train",
            f"--model.preset={preset}",
            "--data.path=synthetic",
            f"--data.seq_len={seq}",
            f"--train.run_dir={tmp}",
            f"--train.steps={steps}",
            f"--train.global_batch={batch}",
            f"--train.micro_batch={batch}",
            f"--train.device={device}",
            f"--train.compile={str(compile_).lower()}",
            "--train.val_every=0",
            "--train.warmup_steps=2",
            "--checkpoint.interval=0",
            "--checkpoint.save_final=false",
            "--metrics.log_every=5",
            "--train.on_bad_loss=off",  # not even the guard's device-side check
            "--metrics.progress=false",
            "--metrics.tensorboard=false",
            *extra,
        ]
        subprocess.run(cmd, check=True)
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tokens_per_s" in r][1:]  # the first window holds warm-up
    best = max(recs, key=lambda r: r["tokens_per_s"])
    system = "triaxis+fsdp" if "--parallel.fsdp_always=true" in extra else "triaxis"
    return {
        "system": system,
        "compile": compile_,
        "tokens_per_s": best["tokens_per_s"],
        "mfu": best["mfu"],
        "peak_mem_gib": best["max_memory_gib"],
    }


def run_baseline(path: str, batch: int, seq: int, compile_: bool) -> dict | None:
    if not Path(path).is_file():
        print(f"baseline {path} not found: skipping the peer", file=sys.stderr)
        return None
    cmd = [sys.executable, path, "--batch", str(batch), "--seq", str(seq)]
    out = subprocess.run(
        cmd + (["--compile"] if compile_ else []), check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--baseline",
        default=str(Path(__file__).resolve().parents[2] / "shared/bench/hf_llama_baseline.py"),
    )
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="bench/gpu_speed.json")
    a = ap.parse_args()
    rows = [run_triaxis(a.preset, a.steps, a.batch, a.seq, not a.no_compile, a.device, [])]
    # The same run wrapped by FSDP with nothing to shard: the wrapper's own cost (dp_shard=1).
    rows.append(
        run_triaxis(
            a.preset,
            a.steps,
            a.batch,
            a.seq,
            not a.no_compile,
            a.device,
            ["--parallel.fsdp_always=true"],
        )
    )
    cost = 1 - rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"FSDP wrapping at dp_shard=1 costs {cost * 100:.1f}% tokens/s")
    if a.device == "cuda":
        for compile_ in (False, True):
            r = run_baseline(a.baseline, a.batch, a.seq, compile_)
            if r:
                rows.append(r)
    ref = next((r for r in rows if r["system"] == "hf-transformers" and r["compile"]), None)
    print(
        f"{'system':<16}{'compile':>8}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'vs compiled':>13}"
    )
    for r in rows:
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "-"
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        print(
            f"{r['system']:<16}{str(r['compile']):>8}{r['tokens_per_s']:>12,.0f}{mfu:>8}"
            f"{r['peak_mem_gib']:>10.1f}{ratio:>13}"
        )
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
