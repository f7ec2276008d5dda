"""GPU and cluster figures, from one file: `triaxis/plan/data/hardware.toml`.

The planner builds its profiles from it (triaxis.plan.hardware) and the training loop reads a
GPU's bf16 peak from it for MFU (triaxis.metrics.logger), so each figure is written once. This
module stays low in the import graph: no torch, no planner (metrics imports it).
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib import resources
from typing import Any

SHIPPED = "plan/data/hardware.toml"
"""The shipped profiles, relative to the triaxis package (read without importing triaxis.plan)."""


def shipped_tables() -> dict[str, Any]:
    """The shipped hardware.toml, parsed: a fresh dict each call (callers merge into it)."""
    return tomllib.loads(resources.files("triaxis").joinpath(SHIPPED).read_text())


@lru_cache(maxsize=2)
def _peaks_by_cuda_name(key: str = "peak_tflops") -> tuple[tuple[str, float], ...]:
    data = shipped_tables()
    tables = [*data.get("gpu", {}).values(), *data.get("gpu_peak", {}).values()]
    return tuple((t["cuda_name"], t.get(key, 0.0) * 1e12) for t in tables if "cuda_name" in t)


def peak_bf16_flops(device_name: str, key: str = "peak_tflops") -> float | None:
    """Dense bf16 peak (FLOP/s) of the GPU that torch.cuda.get_device_name() calls
    `device_name`: the entry whose cuda_name it contains, the longest one when several do (an
    L40S is not an L4); None for a card hardware.toml does not list (or lists without `key`)."""
    hits = [(len(name), peak) for name, peak in _peaks_by_cuda_name(key) if name in device_name]
    best = max(hits, key=lambda h: h[0])[1] if hits else 0.0
    return best or None


def peak_fp8_flops(device_name: str) -> float | None:
    """Dense FP8 peak (FLOP/s) of the card, as peak_bf16_flops; None without FP8 units (A100)."""
    return peak_bf16_flops(device_name, "fp8_tflops")


GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
"""What a GPU torch could use leaves on the node: NVIDIA's kernel driver (CUDA), ROCm's /dev/kfd,
WSL's /dev/dxg. Without any of them torch.cuda.is_available() is False."""


def local_gpu_count(want_gpu: bool = True) -> int:
    """GPUs torch sees on this node (torch.cuda.device_count(), honouring CUDA_VISIBLE_DEVICES);
    0 without want_gpu or without a GPU driver. The driver check comes first because it needs no
    torch: a launch dry run or a --cpu launch then starts without torch's seconds-long import."""
    import os

    if not want_gpu or not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_torch_device(where: str, name: str) -> None:
    """Raise UserError unless torch can place tensors on `name` (cpu, cuda[:N], mps) here: a
    CPU-only torch asserts deep inside the first .to(), which reads as a bug."""
    import torch

    from triaxis.errors import UserError

    kind, sep, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (sep and not index.isdigit()):
        raise UserError(f"{where} {name!r} is not a torch device; use cpu or cuda[:N]")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else "no CUDA GPU visible"
            raise UserError(
                f"{where} {name} but this machine has no CUDA device (torch "
                f"{torch.__version__}, {build}); use {where} cpu"
            )
        if sep and int(index) >= count:
            raise UserError(
                f"{where} {name} but this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}; pick one of them"
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{where} {name} but MPS (Apple GPU) is not available here; use cpu")
