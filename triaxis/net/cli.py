"""`triaxis net check` and `triaxis net bench`: the argument parser and its two commands."""

from __future__ import annotations

import argparse
import json
import os

from triaxis.errors import UserError


def _check(a: argparse.Namespace) -> int:
    from triaxis.net.check import as_json, evaluate, gather, render

    checks = evaluate(gather())
    print(json.dumps(as_json(checks), indent=1) if a.json else render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def _bench(a: argparse.Namespace) -> int:
    from triaxis.launchers.torchrun import TorchrunSpec, launch_module
    from triaxis.net import bench

    bench.check_args(a)
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return bench.main(_bench_argv(a))  # already one worker of a torchrun job
    import torch

    on_gpu = torch.cuda.is_available() and not a.cpu
    nproc = a.nproc_per_node or (torch.cuda.device_count() if on_gpu else 2)
    if nproc * a.nnodes < 2:
        raise UserError(
            "one process measures no collective; use --nproc-per-node 2 or more (or --nnodes 2)"
        )
    if not on_gpu:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = TorchrunSpec(nproc, a.nnodes, a.rdzv_endpoint, a.rdzv_id, a.rdzv_timeout, gpus=on_gpu)
    return launch_module(spec, ["triaxis.net.bench", *_bench_argv(a)])


def _bench_argv(a: argparse.Namespace) -> list[str]:
    """The bench options, handed to every worker unchanged."""
    argv = [
        f"--ops={a.ops}",
        f"--min-bytes={a.min_bytes}",
        f"--max-bytes={a.max_bytes}",
        f"--iters={a.iters}",
        f"--warmup={a.warmup}",
        f"--dtype={a.dtype}",
    ]
    for flag in ("json", "hardware_out", "base_cluster"):
        value = getattr(a, flag)
        if value:
            value = os.path.abspath(value) if flag != "base_cluster" else value
            argv.append(f"--{flag.replace('_', '-')}={value}")
    return argv + (["--cpu"] if a.cpu else [])


def add_net_parser(sub: argparse._SubParsersAction) -> None:
    """Register `triaxis net {check,bench}` on the top-level subparsers."""
    from triaxis.net.bench import add_bench_args

    net = sub.add_parser("net", help="network preflight (check) and collective bandwidth (bench)")
    cmds = net.add_subparsers(dest="net_command", required=True)
    ch = cmds.add_parser(
        "check",
        help="EFA, libfabric, aws-ofi-nccl, GPUDirect RDMA, NCCL and "
        "the environment triaxis sets: pass / warn / fail / skip with the fix",
    )
    ch.add_argument("--json", action="store_true", help="print JSON instead of the list")
    ch.set_defaults(fn=_check)
    be = cmds.add_parser(
        "bench",
        help="all-reduce, all-gather, reduce-scatter, all-to-all and "
        "broadcast bandwidth (nccl-tests formulas) on N processes / nodes",
    )
    be.add_argument(
        "--nproc-per-node",
        type=int,
        default=0,
        help="processes per node (default: GPUs, or 2 on CPU)",
    )
    be.add_argument("--nnodes", type=int, default=1)
    be.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the rendezvous")
    be.add_argument("--rdzv-id", default="triaxis-net-bench")
    be.add_argument("--rdzv-timeout", type=float, default=600.0)
    add_bench_args(be)
    be.set_defaults(fn=_bench)
