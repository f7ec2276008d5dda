"""`triaxis net bench`: collective bandwidth on the current backend, as nccl-tests reports it.

For each collective and message size S (bytes of the whole buffer: the gathered output of
all-gather, the unreduced input of reduce-scatter, one rank's send buffer of all-to-all), with
t the slowest rank's mean time per call over n ranks:

    algbw = S / t
    busbw = algbw x 2(n-1)/n    all-reduce
            algbw x (n-1)/n     all-gather, reduce-scatter, all-to-all
            algbw x 1           broadcast

busbw is comparable across n: it is the bandwidth each rank's link sustains under the optimal
ring algorithm (nccl-tests' doc/PERFORMANCE.md). Element counts are rounded down to a multiple
of n, as nccl-tests does.

JSON (--json PATH), schema "triaxis.net.bench/1":
    {"schema", "backend", "device", "dtype", "torch", "nccl" (or null), "world_size", "nnodes",
     "nproc_per_node", "iters", "warmup",
     "results": [{"op", "size_bytes", "count", "time_us", "algbw_gbps", "busbw_gbps"}, ...],
     "peak_busbw_gbps": {op: the largest busbw over sizes},
     "planner": {"link": "intra_node" | "inter_node",
                 "cluster_fields": fields of a [cluster.NAME] table of triaxis plan's
                 hardware.toml (nvlink_busbw_gbps + nvlink_latency_us on one node;
                 network_gbit + network_efficiency + network_latency_us across nodes)}}
GB/s are 1e9 bytes/s. `--hardware-out FILE --base-cluster p5` writes that table, the base
cluster's other fields kept, for `triaxis plan --hardware FILE --cluster p5-measured`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from triaxis.errors import UserError

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
SCHEMA = "triaxis.net.bench/1"
KIB, MIB, GIB = 2**10, 2**20, 2**30
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw for `op` over n ranks (nccl-tests)."""
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if op == "broadcast":
        return 1.0
    raise ValueError(f"unknown collective {op!r}")


def parse_size(text: str) -> int:
    """'1K', '16M', '1G', '4096' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KIB, "M": MIB, "G": GIB}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise UserError(f"size {text!r} is not a byte count; e.g. 1K, 16M, 1G") from None
    if value < 1:
        raise UserError(f"size {text!r} must be positive")
    return value


def message_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """Doubling sizes from min_bytes up to max_bytes (inclusive)."""
    if min_bytes > max_bytes:
        raise UserError(f"--min-bytes={min_bytes} is above --max-bytes={max_bytes}")
    sizes, s = [], min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= 2
    return sizes


@dataclass
class Row:
    op: str
    size_bytes: int
    count: int
    time_us: float
    algbw_gbps: float
    busbw_gbps: float


def make_row(op: str, count: int, elem_bytes: int, time_s: float, n: int) -> Row:
    size = count * elem_bytes
    algbw = size / time_s / 1e9
    return Row(op, size, count, time_s * 1e6, algbw, algbw * bus_factor(op, n))


def _call(op: str, bufs: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    from triaxis.parallel.compat import all_gather_single, reduce_scatter_single

    if op == "all_reduce":
        dist.all_reduce(bufs[0])
    elif op == "all_gather":
        all_gather_single(bufs[0], bufs[1])
    elif op == "reduce_scatter":
        reduce_scatter_single(bufs[1], bufs[0])
    elif op == "all_to_all":
        dist.all_to_all_single(bufs[1], bufs[0])
    else:
        dist.broadcast(bufs[0], src=0)


def time_op(op: str, count: int, dtype: Any, device: Any, iters: int, warmup: int) -> float:
    """Mean seconds per call on the slowest rank."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    full = torch.ones(count, dtype=dtype, device=device)
    # (full buffer, other buffer): the shard for all-gather / reduce-scatter, a twin otherwise.
    other = torch.ones(
        count // n if op in ("all_gather", "reduce_scatter") else count, dtype=dtype, device=device
    )
    bufs = (full, other)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        _call(op, bufs)
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        _call(op, bufs)
    sync()
    elapsed = torch.tensor(
        [(time.perf_counter() - start) / iters], dtype=torch.float64, device=device
    )
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def run_worker(a: argparse.Namespace) -> dict[str, Any] | None:
    """One rank of the benchmark (torchrun's environment); rank 0 returns the report."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    from datetime import timedelta

    dist.init_process_group(
        "nccl" if on_gpu else "gloo",
        timeout=timedelta(seconds=120),
        device_id=device if on_gpu else None,
    )
    try:
        n = dist.get_world_size()
        elem = DTYPES[a.dtype]
        max_bytes = parse_size(a.max_bytes) if a.max_bytes else (GIB if on_gpu else 16 * MIB)
        rows = []
        for op in a.ops.split(","):
            for size in message_sizes(parse_size(a.min_bytes), max_bytes):
                count = max(n, size // elem // n * n)
                t = time_op(op, count, getattr(torch, a.dtype), device, a.iters, a.warmup)
                rows.append(make_row(op, count, elem, t, n))
        report = {
            "schema": SCHEMA,
            "backend": dist.get_backend(),
            "device": device.type,
            "dtype": a.dtype,
            "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None,
            "world_size": n,
            "nnodes": n // int(os.environ.get("LOCAL_WORLD_SIZE", n)),
            "nproc_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", n)),
            "iters": a.iters,
            "warmup": a.warmup,
            "results": [asdict(r) for r in rows],
        }
        report["peak_busbw_gbps"] = {
            op: max(r.busbw_gbps for r in rows if r.op == op)
            for op in dict.fromkeys(r.op for r in rows)
        }
        report["planner"] = planner_fields(report)
        dist.barrier()
        return report if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def planner_fields(report: dict[str, Any]) -> dict[str, Any]:
    """Measured all-reduce figures as hardware.toml cluster fields (see the module doc)."""
    ar = [r for r in report["results"] if r["op"] == "all_reduce"]
    if not ar:
        return {"link": None, "cluster_fields": {}}
    n = report["world_size"]
    busbw = max(r["busbw_gbps"] for r in ar)
    # A ring all-reduce of a tiny message is 2(n-1) latency-bound steps: the fastest one of at
    # most 8 KiB (the least disturbed) bounds the step latency from above (launch cost included).
    small = [r for r in ar if r["size_bytes"] <= 8 * KIB] or [
        min(ar, key=lambda r: r["size_bytes"])
    ]
    step_us = round(min(r["time_us"] for r in small) / (2 * (n - 1)), 3)
    if report["nnodes"] > 1:
        return {
            "link": "inter_node",
            "cluster_fields": {
                "network_gbit": round(busbw * 8, 3),
                "network_efficiency": 1.0,
                "network_latency_us": step_us,
            },
        }
    return {
        "link": "intra_node",
        "cluster_fields": {"nvlink_busbw_gbps": round(busbw, 3), "nvlink_latency_us": step_us},
    }


def render_table(report: dict[str, Any]) -> str:
    lines = [
        f"# triaxis net bench: {report['backend']} on {report['device']}, "
        f"{report['world_size']} ranks ({report['nnodes']} node(s) x "
        f"{report['nproc_per_node']}), {report['dtype']}, {report['warmup']} warm-up + "
        f"{report['iters']} timed calls per size",
        "# busbw = algbw x 2(n-1)/n (all_reduce), (n-1)/n (all_gather, reduce_scatter, "
        "all_to_all), 1 (broadcast); GB/s = 1e9 B/s",
        f"{'op':<15}{'size(B)':>12}{'count':>12}{'time(us)':>12}{'algbw(GB/s)':>13}"
        f"{'busbw(GB/s)':>13}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['op']:<15}{r['size_bytes']:>12}{r['count']:>12}{r['time_us']:>12.1f}"
            f"{r['algbw_gbps']:>13.3f}{r['busbw_gbps']:>13.3f}"
        )
    peaks = ", ".join(f"{op} {v:.3f}" for op, v in report["peak_busbw_gbps"].items())
    lines.append(f"# peak busbw (GB/s): {peaks}")
    return "\n".join(lines)


def hardware_toml(report: dict[str, Any], base: str) -> str:
    """A [cluster.BASE-measured] table: BASE's fields with the measured ones replaced."""
    from triaxis.hardware import shipped_tables

    shipped = shipped_tables()["cluster"]
    if base not in shipped:
        raise UserError(f"--base-cluster {base!r} is unknown; known: {', '.join(shipped)}")
    table = {
        **shipped[base],
        **report["planner"]["cluster_fields"],
        "source": f"triaxis net bench {report['backend']} {report['world_size']} ranks "
        f"{time.strftime('%Y-%m-%d')}",
    }
    lines = [
        f"# Written by `triaxis net bench`: {base} with measured bus bandwidth.",
        f"[cluster.{base}-measured]",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default=",".join(OPS), help=f"collectives (default {','.join(OPS)})")
    p.add_argument("--min-bytes", default="1K", help="smallest message (default 1K)")
    p.add_argument(
        "--max-bytes", default="", help="largest message, e.g. 64M (default 1G on GPUs, 16M on CPU)"
    )
    p.add_argument("--iters", type=int, default=20, help="timed calls per size")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per size")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even if GPUs exist")
    p.add_argument("--json", default="", metavar="PATH", help="also write the report as JSON")
    p.add_argument(
        "--hardware-out",
        default="",
        metavar="PATH",
        help="write a cluster table for `triaxis plan --hardware` (needs --base-cluster)",
    )
    p.add_argument("--base-cluster", default="", help="cluster whose other fields to keep")


def check_args(a: argparse.Namespace) -> None:
    bad = [op for op in a.ops.split(",") if op not in OPS]
    if bad:
        raise UserError(f"--ops {','.join(bad)} unknown; choose from {','.join(OPS)}")
    if a.iters < 1 or a.warmup < 0:
        raise UserError(f"--iters={a.iters} must be >= 1 and --warmup={a.warmup} >= 0")
    message_sizes(parse_size(a.min_bytes), parse_size(a.max_bytes or "1G"))
    if a.hardware_out and not a.base_cluster:
        raise UserError(
            "--hardware-out needs --base-cluster (e.g. p5): the fields not measured come from it"
        )


def publish(report: dict[str, Any], a: argparse.Namespace) -> None:
    print(render_table(report), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.hardware_out:
        with open(a.hardware_out, "w") as f:
            f.write(hardware_toml(report, a.base_cluster))


def main(argv: list[str] | None = None) -> int:
    """A torchrun worker: `python -m triaxis.net.bench [options]`."""
    p = argparse.ArgumentParser(prog="triaxis net bench (worker)")
    add_bench_args(p)
    a = p.parse_args(argv)
    try:
        check_args(a)
        report = run_worker(a)
        if report is not None:
            publish(report, a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
