"""Restore from the in-memory tier vs from a file: one rank's state (model + Adam moments) handed
to a keeper process and read back into the live tensors, beside the plain-PyTorch way (torch.save
to a file, then torch.load and copy into the live tensors). Prints medians and the ratio. The
keeper's directory is on /dev/shm when it exists (as the launcher puts it). Only the
hand-over/restore path: recovery time (failure -> first new step) is another bench.

    python bench/memory_tier.py --mparams 25 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from triaxis.checkpoint import keeper


def _state(n: int) -> dict:
    # Parameters plus two Adam moments: the optimizer-bearing shard a rank hands over.
    return {"model": {"w": torch.randn(n)}, "optim": {"m": torch.randn(n), "v": torch.randn(n)}}


def _copy(live: dict, got: dict) -> None:
    for k, d in live.items():
        for n, t in d.items():
            t.copy_(got[k][n])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mparams", type=float, default=25.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    state = _state(int(args.mparams * 1e6))
    tmp = tempfile.mkdtemp()
    shm = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else tmp
    path = os.path.join(shm, "k.sock")
    live = {k: {n: torch.empty_like(t) for n, t in d.items()} for k, d in state.items()}
    proc = keeper.start(path, keep=2, max_bytes=1 << 36)
    client = keeper.KeeperClient(path, timeout_s=600)
    plain_save, plain_load, mem_put, mem_get = [], [], [], []
    try:
        for i in range(args.repeats):
            f = os.path.join(tmp, f"s{i}.pt")
            t0 = time.perf_counter()
            torch.save(state, f)
            os.sync()  # what a file-tier restore can rely on after a node crash
            plain_save.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _copy(live, torch.load(f, weights_only=True))
            plain_load.append(time.perf_counter() - t0)
            os.unlink(f)
            t0 = time.perf_counter()
            assert client.put_state(i, 0, state) is None
            mem_put.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _copy(live, client.get_state(i, 0))
            mem_get.append(time.perf_counter() - t0)
    finally:
        proc.kill()
        proc.wait()
        import shutil

        shutil.rmtree(shm, ignore_errors=True)
    nbytes = sum(t.numel() * 4 for d in state.values() for t in d.values())
    print(f"state {nbytes / 1e6:.0f} MB, {args.repeats} repeats, load {os.getloadavg()[0]:.1f}")
    for name, plain, mem in (("save", plain_save, mem_put), ("restore", plain_load, mem_get)):
        p, m = statistics.median(plain), statistics.median(mem)
        print(f"{name}: torch file {p:.3f} s, keeper {m:.3f} s, keeper/file {m / p:.2f}")


if __name__ == "__main__":
    main()
