"""Pipeline bubble per schedule, measured, beside the analytic value.

    python bench/pipeline_bubble.py [--pp 4] [--microbatches 8 16] [--tf-ms 10]

Each stage is a small layer whose forward sleeps tf and whose backward sleeps 2·tf, so the
measurement shows the schedule's own idle time, not this CPU's contention (4 ranks sleep, they
do not compete for the 2 cores). The step runs through torch.distributed.pipelining exactly as
in training. bubble = (T - busy) / busy per rank, T the step's wall time and busy = the rank's
forward + backward time; analytic: (p-1)/m for GPipe and 1F1B, (p-1)/(v·m) interleaved.
Zero-bubble schedules split backward into input- and weight-gradient passes; a sleeping stage
cannot split its backward that way, so their figures here show the schedule's ordering only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

SCHEDULES = {
    "gpipe": 1,
    "1f1b": 1,
    "interleaved-1f1b": 2,
    "looped-bfs": 2,
    "interleaved-zb": 2,
    "zbv": 2,
}


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, tf):
        ctx.tf = tf
        time.sleep(tf)
        return x * w

    @staticmethod
    def backward(ctx, g):
        time.sleep(2 * ctx.tf)
        return g, g.sum().reshape(1), None


class SleepStage(nn.Module):
    def __init__(self, tf: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.tf = tf

    def forward(self, x):
        return _Sleep.apply(x, self.w, self.tf)


def worker(rank: int, world: int, port: int, schedule: str, v: int, m: int, tf: float, q):
    import torch.distributed.pipelining.schedules as S
    from torch.distributed.pipelining import PipelineStage

    from triaxis.parallel.partition import stage_rank
    from triaxis.parallel.pipeline import MULTI, SINGLE

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    num_stages = world * v
    mine = [s for s in range(num_stages) if stage_rank(s, world, schedule) == rank]
    stages = [PipelineStage(SleepStage(tf), s, num_stages, torch.device("cpu")) for s in mine]
    cls = getattr(S, SINGLE.get(schedule) or MULTI[schedule])
    sched = cls(
        stages[0] if schedule in SINGLE else stages,
        n_microbatches=m,
        loss_fn=lambda out, tgt: out.mean(),
    )
    x = torch.ones(m, 4)
    times = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        args = (x,) if 0 in mine else ()
        kwargs = {"target": x} if num_stages - 1 in mine else {}
        sched.step(*args, **kwargs)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    busy = len(mine) * m * 3 * tf
    q.put((rank, min(times[1:]), busy))
    dist.destroy_process_group()


def measure(schedule: str, v: int, p: int, m: int, tf: float) -> dict:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker, args=(r, p, port, schedule, v, m, tf, q)) for r in range(p)]
    for proc in procs:
        proc.start()
    out = [q.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join()
    step = max(t for _, t, _ in out)
    busy = out[0][2]
    per_rank = {r: round(1 - b / step, 3) for r, _, b in sorted(out)}
    analytic = (p - 1) / (v * m) if v > 1 else (p - 1) / m
    return {
        "schedule": schedule,
        "p": p,
        "v": v,
        "m": m,
        "step_s": round(step, 3),
        "bubble": round((step - busy) / busy, 3),
        "analytic": round(analytic, 3),
        "idle_share_per_rank": per_rank,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--tf-ms", type=float, default=10.0)
    a = ap.parse_args()
    rows = []
    print(
        f"{'schedule':<18}{'m':>4}{'step s':>9}{'bubble':>9}{'analytic':>10}  idle share per rank"
    )
    for m in a.microbatches:
        for name, v in SCHEDULES.items():
            r = measure(name, v, a.pp, m, a.tf_ms / 1000)
            rows.append(r)
            print(
                f"{name:<18}{m:>4}{r['step_s']:>9.3f}{r['bubble']:>9.3f}{r['analytic']:>10.3f}"
                f"  {list(r['idle_share_per_rank'].values())}",
                flush=True,
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
