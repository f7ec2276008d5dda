"""What an async checkpoint save blocks training for: the host copy of the state (staging).
Today's path before this change, DCP's FileSystemWriter.stage (fresh host memory at every
save), against triaxis.checkpoint.staging.ReusedStaging (buffers allocated once, refilled), in
the same run, on the same state.

    python bench/async_save_staging.py [--mb 512] [--tensors 64] [--saves 7]

Each path stages the state --saves times (the state changes in between, as training does);
prints the median wall and CPU seconds per save of saves 2.. (the first save allocates on both
paths) and the ratio. Not a test: prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp

from triaxis.checkpoint.staging import ReusedStaging


def run(state: dict, stage, saves: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(saves):
        for t in state["model"].values():
            t.add_(1.0)  # a training step between saves
        w0, c0 = time.perf_counter(), time.process_time()
        staged = stage(state)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        del staged  # written and dropped, as after a write
    return statistics.median(wall[1:]), statistics.median(cpu[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="state size, MB of fp32")
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--saves", type=int, default=7)
    args = ap.parse_args()
    numel = args.mb * 2**20 // 4 // args.tensors
    state = {
        "model": {f"t{i}": torch.randn(numel) for i in range(args.tensors)},
        "train": {"step": 0, "rng": torch.get_rng_state()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        reused = ReusedStaging()
        paths = {
            "writer.stage (fresh copy)": lambda s: dcp.FileSystemWriter(tmp).stage(s),
            "ReusedStaging": lambda s: reused.stage(s, dcp.FileSystemWriter(tmp)),
        }
        got = {name: run(state, stage, args.saves) for name, stage in paths.items()}
        reused.close()
    print(f"{'path':<28} {'wall s / save':>14} {'cpu s / save':>13}")
    for name, (wall, cpu) in got.items():
        print(f"{name:<28} {wall:>14.3f} {cpu:>13.3f}")
    (w0, c0), (w1, c1) = got.values()
    print(f"reused / fresh: wall {w1 / w0:.2f}, cpu {c1 / c0:.2f}")
    print(json.dumps({"args": vars(args), "median_s": got}))


if __name__ == "__main__":
    main()
