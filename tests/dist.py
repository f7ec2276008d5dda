"""Multi-process test harness: fork-started gloo workers on loopback, each with a timeout."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WAIT_S = 600
"""How long a wait may last before it counts as a hang: a rank's report, a collective. Generous
on purpose: on a machine shared with other CPU-heavy jobs a step can take 10x its idle time,
and a test that fails fast on an error (reported at once) need not time out early."""


def init_gloo(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    """Join the workers' gloo group on loopback (WAIT_S on each collective). `backend`: a
    registered stand-in for gloo (tests/device_rules.py's)."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=WAIT_S),
    )


def _worker(
    rank: int, world: int, port: int, fn: Callable, args: tuple, queue, backend: str
) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
        init_gloo(rank, world, port, backend)
        out = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        # Plain pickle copies tensor data; the queue's own pickler would pass shared-memory
        # handles that die with this process.
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report everything, including SystemExit, to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_workers(
    fn: Callable, world: int, *args: Any, timeout_s: float = WAIT_S, backend: str = "gloo"
) -> list[Any]:
    """Run fn(rank, world, *args) in `world` forked processes; return their results by rank.
    timeout_s: the longest wait for the next rank's report (a hang detector, not a duration).
    backend: the default group's (a registered stand-in for gloo, see tests/device_rules.py)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, backend), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, out = queue.get(timeout=timeout_s)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{out}")
            results[rank] = pickle.loads(out)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
