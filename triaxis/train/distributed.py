"""Process-group set-up and tear-down, from torchrun's environment (or none: one process)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from triaxis.errors import UserError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool
    """True when this process created the process group (and so must destroy it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but no CUDA GPU is visible; use --train.device=cpu "
                        "or auto")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(requested_device: str, timeout_s: float = 300.0,
                     need_group: bool = False) -> DistEnv:
    """Join the job's process group: NCCL on GPUs, gloo on CPU. A group made by the caller
    (tests) is used as it is. One process gets a group of its own only if `need_group`
    (FSDP wrapping at world size 1)."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local, pick_device(requested_device, local), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local)
    if world == 1 and not need_group:
        return DistEnv(0, 1, 0, device, False)
    if world == 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
        return DistEnv(0, 1, 0, device, True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A fresh store prefix per elastic restart: re-using the previous attempt's keys made
    # rendezvous read stale peer addresses and hang (see shared notes on torchrun restarts).
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=timeout_s))
    store = dist.PrefixStore(f"triaxis_attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world, local, device, True)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        # Without this barrier ranks sometimes abort at exit while a peer still sends.
        dist.barrier()
        dist.destroy_process_group()
