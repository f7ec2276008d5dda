"""Recovery with and without the memory tier (issue 30), through `triaxis launch` as a user runs
it: a ~100M-parameter model on 2 ranks (dp_shard=2), rank 1 SIGKILLed as step KILL starts,
torchelastic restarts both workers (--max-restarts 1).

  durable  -- today's way: checkpoint.interval only; the restart loads the newest durable
              checkpoint and redoes the steps after it.
  memory   -- the same plus checkpoint.memory_interval: the restart restores from the node's
              keeper.

For each: the time from the failure to the first step the restarted workers finish, the time
until the run is back at the step that failed (the work lost is redone by then), and the steps
lost. The bench also runs the model uninterrupted with memory_interval = 10 and without the
memory tier, alternating, and prints the per-step cost of the tier (its blocking copy time
from metrics.jsonl, over the run's step time; and the two runs' median step times).

Step times come from metrics.jsonl as its lines appear (polled every 20 ms): the kill strikes
as step KILL starts, right after step KILL-1's record is written.

    python bench/memory_recovery.py                     # ~100M parameters, a few minutes
    python bench/memory_recovery.py --layers 2 --dim 128  # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_ROOTS: list[Path] = []


def prepare(root: Path) -> Path:
    data = root / "data"
    subprocess.run(
        [sys.executable, "-m", "triaxis", "prepare", "--output", str(data), "--tokenizer",
         "byte", "--max-bytes", "2000000"],
        check=True, capture_output=True,
    )  # fmt: skip
    return data


class Tail:
    """(arrival time, record) of each line metrics.jsonl gains while the job runs."""

    def __init__(self, path: Path):
        self.path, self.seen, self._stop = path, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset, buf = 0, b""
        while not self._stop.is_set():
            if self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                buf += chunk
                now = time.monotonic()
                *lines, buf = buf.split(b"\n")
                self.seen += [(now, json.loads(line)) for line in lines if line.strip()]
            time.sleep(0.02)

    def stop(self) -> list[tuple[float, dict]]:
        self._stop.set()
        self._thread.join()
        return [(t, r) for t, r in self.seen if "loss" in r or "memory_checkpoint_s" in r]


def run(args, data: Path, root: Path, name: str, extra: list[str], env: dict) -> tuple:
    run_dir = root / name
    cmd = [
        sys.executable, "-m", "triaxis", "launch", "--nproc-per-node", "2", "--max-restarts", "1",
        f"--data.path={data}", f"--train.run_dir={run_dir}", "--model.preset=small",
        f"--model.dim={args.dim}", f"--model.n_layers={args.layers}", "--model.n_heads=12",
        "--model.n_kv_heads=4", f"--model.ffn_dim={args.ffn}", f"--data.seq_len={args.seq}",
        "--train.global_batch=2", "--train.micro_batch=1", "--parallel.dp_shard=2",
        f"--train.steps={args.steps}", "--train.val_every=0", "--metrics.log_every=1",
        "--metrics.progress=false", "--metrics.tensorboard=false", "--checkpoint.async_save=true",
        *extra,
    ]  # fmt: skip
    tail = Tail(run_dir / "metrics.jsonl")
    t0 = time.monotonic()
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.monotonic() - t0
    seen = tail.stop()
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return seen, wall, out.stdout + out.stderr


def step_times(seen) -> list[float]:
    steps = [(t, r["step"]) for t, r in seen if "loss" in r]
    return [b[0] - a[0] for a, b in zip(steps, steps[1:]) if b[1] == a[1] + 1]


def recovery(seen, kill: int) -> tuple[float, float, int]:
    """(failure -> first step after the restart, failure -> the failed step done again,
    steps redone)."""
    steps = [(t, r["step"]) for t, r in seen if "loss" in r]
    t_fail = next(t for t, s in steps if s == kill - 1)
    first = next((t, s) for t, s in steps if t > t_fail)
    back = next(t for t, s in steps if t > t_fail and s == kill)
    return first[0] - t_fail, back - t_fail, kill - first[1]


def shape_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The model (about 100M parameters by default) and tiers both recovery benches run."""
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--interval", type=int, default=10, help="durable checkpoint.interval")
    ap.add_argument("--memory-interval", type=int, default=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    shape_args(ap, steps=24)
    ap.add_argument("--kill", type=int, default=18)
    ap.add_argument("--cost-steps", type=int, default=30)
    ap.add_argument("--cost-repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="triaxis-memrec-"))
    _ROOTS.append(root)
    data = prepare(root)
    from triaxis.config import load_config
    from triaxis.model import param_counts
    from triaxis.model.presets import build_model_args

    cfg = load_config(None, [f"--model.dim={args.dim}", f"--model.n_layers={args.layers}",
                             "--model.n_heads=12", "--model.n_kv_heads=4",
                             f"--model.ffn_dim={args.ffn}", "--model.preset=small"])  # fmt: skip
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    n = param_counts(build_model_args(cfg.model, vocab))["total"]
    print(f"model: {n / 1e6:.0f}M parameters, 2 ranks (dp_shard=2), seq {args.seq}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip

    kill_env = {"TRIAXIS_FAULT_KILL": f"1:{args.kill}"}
    durable = [f"--checkpoint.interval={args.interval}"]
    memory = durable + [f"--checkpoint.memory_interval={args.memory_interval}"]
    rows = []
    for name, extra in (("durable only", durable), ("memory tier", memory)):
        seen, wall, text = run(args, data, root, name.replace(" ", "_"), extra, kill_env)
        first, back, lost = recovery(seen, args.kill)
        tier = "memory" if "restored from the memory tier" in text else "durable"
        rows.append((name, tier, first, back, lost, statistics.median(step_times(seen))))
    print(f"\nSIGKILL of rank 1 as step {args.kill} starts (durable every {args.interval}, memory "
          f"every {args.memory_interval}):")  # fmt: skip
    print(f"{'':14} {'tier':>8} {'to first step':>14} {'back at failed step':>20} "
          f"{'steps redone':>13} {'step s':>7}")  # fmt: skip
    for name, tier, first, back, lost, step in rows:
        print(f"{name:14} {tier:>8} {first:13.1f}s {back:19.1f}s {lost:13d} {step:7.2f}")
    d, m = rows
    print(f"memory/durable: back at the failed step {m[3] / d[3]:.2f}x "
          f"({d[3] - m[3]:.1f} s less downtime)")  # fmt: skip

    # Per-step cost at memory_interval = 10, uninterrupted, the two alternating.
    off_steps, on_steps, copy_s, on_total = [], [], [], 0.0
    plain = [f"--train.steps={args.cost_steps}", "--checkpoint.interval=0",
             "--checkpoint.save_final=false"]  # fmt: skip
    for i in range(args.cost_repeats):
        for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
            extra = plain + (["--checkpoint.memory_interval=10"] if name == "on" else [])
            seen, _, _ = run(args, data, root, f"cost_{name}_{i}", extra, {})
            times = step_times(seen)[2:]  # after the first steps' warm-up
            if name == "off":
                off_steps += times
            else:
                on_steps += times
                on_total += sum(times)
                copy_s += [r["memory_checkpoint_s"] for _, r in seen if "memory_checkpoint_s" in r]
    med_off, med_on = statistics.median(off_steps), statistics.median(on_steps)
    mean_off, mean_on = statistics.mean(off_steps), statistics.mean(on_steps)
    print(f"\nper-step cost, memory_interval=10 ({args.cost_repeats} x {args.cost_steps} steps "
          f"each, alternating):")  # fmt: skip
    print(
        f"  copy into the keeper: median {statistics.median(copy_s):.3f} s per copy = "
        f"{statistics.median(copy_s) / 10 / med_off:.2%} of a step at one copy per 10 steps"
    )
    print(
        f"  step time: off median {med_off:.3f} s / mean {mean_off:.3f} s, on median "
        f"{med_on:.3f} s / mean {mean_on:.3f} s; on/off mean {mean_on / mean_off:.3f}x"
    )
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    import atexit
    import shutil

    # Checkpoints of a 100M model, several runs: GBs that must not outlive the bench.
    atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _ROOTS])
    main()
