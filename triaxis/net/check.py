"""`triaxis net check`: is this node ready for multi-node training over EFA?

Facts are gathered once (`gather`, the only part that touches the machine) and judged by
`evaluate`, a pure function, so every branch is testable with made-up facts. Each check is pass,
warn, fail or skip, with the fix. A CPU machine gets skips and warnings, never a crash: the
checks that need a GPU or EFA say so and step aside.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from triaxis.launchers.netenv import (
    SYS_INFINIBAND,
    default_route_interface,
    efa_devices,
    recommended_env,
)

Status = Literal["pass", "warn", "fail", "skip"]
EFA_PREFIX = Path("/opt/amazon/efa")
# Where the AWS images and the EFA installer put the aws-ofi-nccl plugin.
OFI_NCCL_DIRS = (
    "/opt/amazon/ofi-nccl/lib",
    "/opt/amazon/ofi-nccl/lib64",
    "/opt/aws-ofi-nccl/lib",
    "/usr/local/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
)
OFI_NCCL_NAMES = ("libnccl-net-ofi.so", "libnccl-net.so")


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class NetFacts:
    efa_devices: list[str] = field(default_factory=list)
    fi_info: str | None = None
    """Path of fi_info, if installed."""
    fi_info_efa: tuple[int, str] | None = None
    """(exit code, output) of `fi_info -p efa`; None when not run."""
    libfabric: str | None = None
    ofi_nccl_plugin: str | None = None
    peermem_loaded: bool = False
    gpus: int = 0
    nccl_version: str | None = None
    """None: no NCCL in this PyTorch build (or no GPU)."""
    interface: str | None = None
    environ: dict[str, str] = field(default_factory=dict)


def _find_plugin(environ: Mapping[str, str]) -> str | None:
    dirs = [d for d in environ.get("LD_LIBRARY_PATH", "").split(":") if d] + list(OFI_NCCL_DIRS)
    for d in dirs:
        for name in OFI_NCCL_NAMES:
            if (Path(d) / name).exists():
                return str(Path(d) / name)
    return None


def _find_libfabric() -> str | None:
    for p in (EFA_PREFIX / "lib" / "libfabric.so.1", EFA_PREFIX / "lib64" / "libfabric.so.1"):
        if p.exists():
            return str(p)
    return ctypes.util.find_library("fabric")


def gather(
    environ: Mapping[str, str] = os.environ,
    sysfs: Path = SYS_INFINIBAND,
    modules: Path = Path("/proc/modules"),
) -> NetFacts:
    """Read this node: sysfs, /proc/modules, libraries on disk, fi_info, torch."""
    import torch

    path = environ.get("PATH", os.defpath) + os.pathsep + str(EFA_PREFIX / "bin")
    facts = NetFacts(
        efa_devices=efa_devices(sysfs),
        fi_info=shutil.which("fi_info", path=path),
        libfabric=_find_libfabric(),
        ofi_nccl_plugin=_find_plugin(environ),
        interface=default_route_interface(),
        environ=dict(environ),
    )
    if facts.fi_info and facts.efa_devices:
        try:
            p = subprocess.run(
                [facts.fi_info, "-p", "efa"], capture_output=True, text=True, timeout=20
            )
            facts.fi_info_efa = (p.returncode, p.stdout + p.stderr)
        except subprocess.TimeoutExpired:
            facts.fi_info_efa = (124, "fi_info -p efa did not answer within 20 s")
    try:
        facts.peermem_loaded = any(
            line.split()[0] == "nvidia_peermem" for line in modules.read_text().splitlines() if line
        )
    except OSError:
        pass
    facts.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if facts.gpus and torch.distributed.is_nccl_available():
        facts.nccl_version = ".".join(map(str, torch.cuda.nccl.version()))
    return facts


def evaluate(f: NetFacts) -> list[Check]:
    efa, gpu = bool(f.efa_devices), f.gpus > 0
    out: list[Check] = []
    if efa:
        out.append(
            Check(
                "efa devices",
                "pass",
                f"{len(f.efa_devices)} EFA device(s): {', '.join(f.efa_devices)}",
            )
        )
    else:
        out.append(
            Check(
                "efa devices",
                "warn" if gpu else "skip",
                "no EFA device in /sys/class/infiniband: traffic between nodes goes "
                "over TCP sockets",
                "fine on one node or on CPU; on AWS use an EFA instance type (p4d, p5, "
                "trn1) with EFA interfaces attached (InterfaceType=efa)",
            )
        )
    if not efa:
        out.append(Check("fi_info -p efa", "skip", "no EFA device"))
    elif not f.fi_info:
        out.append(
            Check(
                "fi_info -p efa",
                "fail",
                "fi_info not found",
                "install the EFA software (aws-efa-installer): /opt/amazon/efa/bin",
            )
        )
    elif f.fi_info_efa is None or f.fi_info_efa[0] != 0 or "provider: efa" not in f.fi_info_efa[1]:
        msg = (f.fi_info_efa[1].strip().splitlines() or [""])[-1] if f.fi_info_efa else ""
        out.append(
            Check(
                "fi_info -p efa",
                "fail",
                f"libfabric lists no efa provider: {msg}",
                "check the EFA driver (`lsmod | grep efa`) and reinstall aws-efa-installer",
            )
        )
    else:
        n = f.fi_info_efa[1].count("provider: efa")
        out.append(Check("fi_info -p efa", "pass", f"efa provider: {n} endpoint(s)"))
    if f.libfabric:
        out.append(Check("libfabric", "pass", f.libfabric))
    else:
        out.append(
            Check(
                "libfabric",
                "fail" if efa else "skip",
                "libfabric not found",
                "install aws-efa-installer (it ships libfabric in /opt/amazon/efa)",
            )
        )
    if f.ofi_nccl_plugin:
        out.append(Check("aws-ofi-nccl", "pass", f.ofi_nccl_plugin))
    elif efa and gpu:
        out.append(
            Check(
                "aws-ofi-nccl",
                "fail",
                "no NCCL OFI plugin: NCCL would use TCP sockets instead of EFA",
                "install aws-ofi-nccl (the AWS DLCs have it in /opt/amazon/ofi-nccl) "
                "and put its lib folder on LD_LIBRARY_PATH",
            )
        )
    else:
        out.append(Check("aws-ofi-nccl", "skip", "needs EFA and GPUs"))
    if not (efa and gpu):
        out.append(Check("gpudirect rdma", "skip", "needs EFA and GPUs"))
    elif f.peermem_loaded:
        out.append(Check("gpudirect rdma", "pass", "nvidia_peermem loaded"))
    else:
        out.append(
            Check(
                "gpudirect rdma",
                "fail",
                "nvidia_peermem not loaded: the NIC cannot read GPU memory directly",
                "sudo modprobe nvidia_peermem (and add it to /etc/modules-load.d)",
            )
        )
    if not gpu:
        out.append(Check("nccl", "skip", "no GPU visible: gloo on CPU"))
    elif f.nccl_version:
        out.append(Check("nccl", "pass", f"NCCL {f.nccl_version}"))
    else:
        out.append(
            Check(
                "nccl", "fail", "this PyTorch build has no NCCL", "install a CUDA build of PyTorch"
            )
        )
    if f.interface:
        out.append(
            Check(
                "interface",
                "pass",
                f"default route on {f.interface}; a multi-node "
                "launch binds the interface that reaches the rendezvous host",
            )
        )
    else:
        out.append(
            Check(
                "interface",
                "warn",
                "no default IPv4 route",
                "multi-node jobs need a route between the nodes",
            )
        )
    out += _env_checks(f, efa, gpu)
    return out


def _env_checks(f: NetFacts, efa: bool, gpu: bool) -> list[Check]:
    out = []
    for var in recommended_env(efa, gpu, f.interface):
        mine = f.environ.get(var.name)
        when = "multi-node: " if var.name.endswith("SOCKET_IFNAME") else ""
        if mine is None or mine == var.value:
            out.append(
                Check(
                    f"env {var.name}",
                    "pass",
                    f"{when}triaxis sets {var.name}={var.value}: {var.why}",
                )
            )
        else:
            out.append(
                Check(
                    f"env {var.name}",
                    "warn",
                    f"{var.name}={mine} is set; triaxis keeps it instead of {var.value}",
                    f"unset {var.name} unless you mean it ({var.why})",
                )
            )
    if efa and f.environ.get("NCCL_NET", "").lower() == "socket":
        out.append(Check("env NCCL_NET", "fail", "NCCL_NET=Socket bypasses EFA", "unset NCCL_NET"))
    return out


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"[{c.status:<4}] {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in ("warn", "fail"):
            lines.append(f"       {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "warn", "fail", "skip")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def as_json(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
