"""How host values cross ranks: the one way, next to the device collectives.

On GPUs the default group and every mesh group are NCCL groups, and NCCL serves device tensors
only: a host (CPU) tensor there fails with `No backend type associated with device type cpu`.
So a value that lives in host memory (a Python number, a flag, a count of bytes, a gradient of
FSDP's CPU offload) travels one of two ways, chosen per call site:

* over a host group (`new_host_group`, gloo, which serves CPU tensors on every machine) with
  `host_all_reduce` / `host_all_gather_object`: for values born on the host and read on the
  host (log-step records, agreement flags), where a trip to the device would only add two
  copies and wait for the queued kernels;
* onto the device first (`to_device`), then the device group: for a value the device needs
  next (the gradient norm that clipping multiplies the gradients by).

Device values (the loss, token counts of device batches) use the device group directly.
tests/test_device_rules.py runs the trainer under a CPU proxy of NCCL's rule;
tests/test_collectives_static.py lists every collective call site in the package.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

HOST_BACKEND = "gloo"
HOST_GROUP_DESC = "triaxis_host"


def new_host_group(purpose: str = ""):
    """A gloo group over all ranks for host values; None without a process group. Every rank
    must create its host groups in the same order (new_group is a collective). `purpose` names
    the group in Flight Recorder dumps (`triaxis_host:PURPOSE`), so a hang report says which."""
    if not dist.is_initialized():
        return None
    desc = f"{HOST_GROUP_DESC}:{purpose}" if purpose else HOST_GROUP_DESC
    return dist.new_group(backend=HOST_BACKEND, group_desc=desc)


def _check_group(group) -> None:
    # An invariant, not a user error: only a group made here is known to be gloo on a GPU
    # machine too (on CPU the default group is gloo as well, so the backend alone proves
    # nothing there).
    assert group is not None and group.group_desc.partition(":")[0] == HOST_GROUP_DESC, (
        "host values travel over a host group (triaxis.parallel.host.new_host_group)"
    )


def host_all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """All-reduce the host tensor `t` in place over the host `group`; the work if async_op."""
    assert t.device.type == "cpu", f"a host collective got a {t.device} tensor"
    _check_group(group)
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def host_all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's host tensor `t` (the same shape and dtype on all), over the host `group`:
    numbers without a pickle."""
    assert t.device.type == "cpu", f"a host collective got a {t.device} tensor"
    _check_group(group)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def host_all_gather_object(obj, group, world_size: int) -> list:
    """Every rank's `obj` (picklable), over the host `group` (never the device group: its
    pickles would go to the device and back)."""
    _check_group(group)
    out: list = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` (itself when it is there already), for a host value that a device
    collective and the device computation after it need. A DTensor moves its local tensor and
    keeps its placements: its own `.to` would first reduce a partial value across ranks, on
    the host, over the device group."""
    if hasattr(t, "to_local"):
        from torch.distributed.tensor import DTensor

        local = t.to_local().to(device, non_blocking=True)
        return DTensor.from_local(
            local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
    return t.to(device, non_blocking=True)
