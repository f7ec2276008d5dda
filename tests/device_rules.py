"""A CPU proxy for NCCL's device rule: the device group serves device tensors only.

On GPUs the default group and every mesh group are NCCL groups, and NCCL refuses a host (CPU)
tensor: `RuntimeError: No backend type associated with device type cpu`. On CPU with gloo every
tensor is a CPU tensor, so the multi-process tests cannot see a host value sent over the device
group. This proxy makes them see it. Inside `device_rules()` (one worker process):

* the default group (and so every mesh group made from it) runs under a backend of its own,
  DEVICE_BACKEND (gloo underneath); groups made with backend="gloo" (triaxis.parallel.host) are
  the host groups and serve everything, as gloo does on a GPU machine;
* the trainer's device is SENTINEL (`cpu:0`) instead of `cpu`, and so is FSDP's (torch picks the
  current CUDA device there): tensors made for the device are told apart from host ones by the
  device argument they were made with;
* `HostMarks`, a TorchFunctionMode, marks host tensors: made by a factory with no device
  argument (`torch.tensor(x)`, `torch.zeros(1)`, `torch.from_numpy`), by `.cpu()` or with the
  string `"cpu"` (the model materialized on the host for CPU offload), and anything computed
  from host tensors alone (a DTensor through its local tensor; FSDP's offloaded gradients, as
  the gradients of host parameters). A device argument of SENTINEL unmarks; a
  `torch.device("cpu")` object (often a tensor's own `.device`, which reports `cpu` here)
  keeps what the inputs were;
* `RefuseHostOnDevice`, a TorchDispatchMode, carries the marks through what HostMarks does not
  see (DTensor's local computation, the backward pass), sees every collective (`c10d.*` from
  `dist.all_reduce` and friends, `_c10d_functional.*` from DTensor) and raises NCCL's error
  when a marked tensor meets a group of DEVICE_BACKEND.

Limits (see docs/parallelism.md, "Host values and the device group"): a host value made where
the proxy cannot see it (C++ inside torch, a tensor built from a Python buffer by a legacy
constructor) is not marked, so it is not caught; `x.to(t.device)` cannot move a host tensor to
the device here (`t.device` reports plain `cpu`), so triaxis code moves values with the trainer's
device object; collectives run inside a torch.compile'd region are not seen (the proxy runs
eager).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

SENTINEL = torch.device("cpu", 0)
"""The proxy's device: a CPU device that factories and `.to` calls can be told apart by."""
DEVICE_BACKEND = "devproxy"
"""The default group's backend in the proxy: what NCCL is on a GPU machine."""
HOST_ERROR = "No backend type associated with device type cpu"
"""NCCL's message (torch's, in fact) for a host tensor on a device-only group."""

_MARK = "_triaxis_host"
_FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.from_numpy,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.scalar_tensor,
}


def _is_host(t) -> bool:
    if not isinstance(t, torch.Tensor):
        return False
    if getattr(t, _MARK, False):
        return True
    local = getattr(t, "_local_tensor", None)  # a DTensor is where its local tensor is
    return local is not None and getattr(local, _MARK, False)


def _mark(out) -> None:
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            setattr(t, _MARK, True)
            local = getattr(t, "_local_tensor", None)
            if local is not None:
                setattr(local, _MARK, True)


def _unmark(out) -> None:
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and getattr(t, _MARK, False):
            setattr(t, _MARK, False)


def _where(device) -> str:
    """'device', 'host' or 'same' (what the inputs were) for a device argument."""
    if device is None:
        return "same"
    if torch.device(device) == SENTINEL:
        return "device"
    if isinstance(device, str) and torch.device(device).type == "cpu":
        return "host"  # the literal "cpu": host memory on purpose
    return "same"  # a torch.device("cpu") object: often a tensor's own .device, or meta


def _to_device_arg(args, kwargs):
    """The device argument of a Tensor.to call as written (None: dtype / tensor / none)."""
    if "device" in kwargs:
        return kwargs["device"]
    first = args[1] if len(args) > 1 else None
    return first if isinstance(first, (str, torch.device)) else None


class HostMarks(TorchFunctionMode):
    """Marks the tensors that would live in host memory on a GPU machine (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu:
            _mark(out)
            return out
        device = _to_device_arg(args, kwargs) if func is torch.Tensor.to else kwargs.get("device")
        where = _where(device)
        if func in _FACTORIES and "device" not in kwargs:
            where = "host"  # no device: the host, wherever the code runs
        if where == "device":
            _unmark(out)  # e.g. x.to(SENTINEL), torch.zeros(1, device=SENTINEL)
        elif where == "host":
            _mark(out)  # e.g. module.to_empty(device="cpu"): parameters on the host
        elif func not in _FACTORIES:
            _propagate(args, kwargs, out)
        return out


def _propagate(args, kwargs, out) -> None:
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if tensors and all(_is_host(t) for t in tensors):
        _mark(out)  # computed from host values alone: still on the host


def _group_of(args) -> dist.ProcessGroup | None:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a)
            except (RuntimeError, TypeError):
                continue
    if args and isinstance(args[-1], str):  # functional collectives name their group
        try:
            return dist.distributed_c10d._resolve_process_group(args[-1])
        except (RuntimeError, ValueError, KeyError):
            return None
    return None


class RefuseHostOnDevice(TorchDispatchMode):
    """Raises NCCL's error when a marked (host) tensor meets a device-backend group."""

    refused: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.refused = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor's own dispatch first: its local collectives come back
        if func.namespace in ("c10d", "_c10d_functional"):
            group = _group_of(args)
            if group is not None and dist.get_backend(group) == DEVICE_BACKEND:
                host = [t for t in pytree.tree_leaves(args) if _is_host(t)]
                if host:
                    what = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in host)
                    self.refused.append(f"{func} {what}")
                    raise RuntimeError(
                        f"{HOST_ERROR} (device-rules proxy: {func} on the device group got "
                        f"host tensor(s) {what}; NCCL serves device tensors only)"
                    )
        out = func(*args, **kwargs)
        # Marks also flow through what HostMarks does not see: DTensor's local computation,
        # autograd's backward.
        if not (
            func is torch.ops.aten._to_copy.default and _where(kwargs.get("device")) == "device"
        ):
            _propagate(args, kwargs, out)
        return out


def _gloo(store, rank, size, timeout):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def register_backend() -> None:
    if DEVICE_BACKEND.upper() not in vars(dist.Backend):
        dist.Backend.register_backend(DEVICE_BACKEND, _gloo, devices=["cpu"])


def _fsdp_device(mesh):
    return SENTINEL


_object_device = dist.distributed_c10d._get_object_coll_device


def _object_coll_device(group=None) -> str:
    # NCCL's object collectives pickle into a tensor on the current CUDA device.
    group = group or dist.distributed_c10d._get_default_group()
    if dist.get_backend(group) == DEVICE_BACKEND:
        return str(SENTINEL)
    return _object_device(group)


@contextlib.contextmanager
def device_rules():
    """Inside a worker whose default group uses DEVICE_BACKEND: mark host tensors, refuse them
    on the device groups, give FSDP the sentinel device. Yields the refusing mode (its
    `refused` lists what was refused)."""
    refuse = RefuseHostOnDevice()
    fsdp = "torch.distributed.fsdp._fully_shard._fully_shard._get_device_from_mesh"
    objects = "torch.distributed.distributed_c10d._get_object_coll_device"
    with (
        mock.patch(fsdp, _fsdp_device),
        mock.patch(objects, _object_coll_device),
        HostMarks(),
        refuse,
    ):
        yield refuse
