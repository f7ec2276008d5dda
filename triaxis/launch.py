"""`triaxis launch`: the built-in launcher, on PyTorch's elastic agent (torch.distributed.run).

It validates the config against the world size first (one clear error instead of one per rank),
picks NCCL on GPUs or gloo on CPU, then hands over to torchrun with `triaxis train` as the
worker entry point. Elastic restarts (--max-restarts) restart the whole worker group, which then
resumes from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from triaxis.errors import UserError


def torchrun_args(a: argparse.Namespace, nproc: int, config_path: str | None,
                  overrides: list[str]) -> list[str]:
    argv = [f"--nproc-per-node={nproc}", f"--nnodes={a.nnodes}",
            f"--max-restarts={a.max_restarts}"]
    if a.nnodes == 1 and not a.rdzv_endpoint:
        argv.append("--standalone")
    else:
        if not a.rdzv_endpoint:
            raise UserError(f"--nnodes={a.nnodes} needs --rdzv-endpoint HOST:PORT, the address "
                            "of the first node, reachable from every node")
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={a.rdzv_endpoint}",
                 f"--node-rank={a.node_rank}"]
    return argv + ["-m", "triaxis", "train"] + ([config_path] if config_path else []) + overrides


def launch(a: argparse.Namespace) -> int:
    import torch

    from triaxis.cli import _split_config
    from triaxis.config import load_config
    from triaxis.train.loop import resolve

    config_path, overrides = _split_config(a.rest)
    cfg = load_config(config_path, overrides)
    on_gpu = torch.cuda.is_available() and not a.cpu and cfg.train.device != "cpu"
    nproc = a.nproc_per_node or (torch.cuda.device_count() if on_gpu else 2)
    if a.nproc_per_node < 0 or a.nnodes < 1:
        raise UserError(f"--nproc-per-node={a.nproc_per_node} and --nnodes={a.nnodes} must be "
                        "positive")
    if on_gpu and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc-per-node={nproc} but this node has "
                        f"{torch.cuda.device_count()} GPUs; use at most that many")
    resolve(cfg, nproc * a.nnodes)
    if not on_gpu:
        overrides = overrides + ["--train.device=cpu"]
        # Share the cores between the CPU workers instead of oversubscribing them.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    argv = torchrun_args(a, nproc, config_path, overrides)
    print(f"triaxis launch: {nproc * a.nnodes} processes ({a.nnodes} node(s) x {nproc}, "
          f"{'nccl' if on_gpu else 'gloo'}): torchrun {' '.join(argv)}", file=sys.stderr)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        print(f"triaxis launch: worker(s) failed with exit codes {codes}", file=sys.stderr)
        return next((c for c in codes if c and c > 0), 1)
    return 0
