"""Network facts the launcher needs, and the environment it sets for gloo, NCCL and libfabric.

Before it starts torchrun on a node of a multi-node job, the launcher asks: which local address
and interface reach the rendezvous host (workers advertise that address and gloo/NCCL bind that
interface: the hostname may resolve to another NIC, or to nothing), is the rendezvous host this
node (then this node serves the store), and does the node have EFA devices (then libfabric must
be told to use them). Everything here reads the kernel's view; nothing sends a packet.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

SYS_INFINIBAND = Path("/sys/class/infiniband")
_SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of an interface


def resolve(host: str) -> list[str]:
    """IPv4 addresses of `host`, in resolver order; [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(str(i[4][0]) for i in infos))


def is_local_address(addr: str) -> bool:
    """True when `addr` belongs to this node: binding to it succeeds only then. Unlike comparing
    hostnames (torchrun's guess), this holds in network namespaces and on multi-NIC hosts."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


def source_address(addr: str) -> str | None:
    """The local address the kernel picks to reach `addr` (a UDP connect sends no packet);
    None when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def interface_of(addr: str) -> str | None:
    """The name of the interface that holds the IPv4 address `addr`."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
        if socket.inet_ntoa(raw[20:24]) == addr:
            return name
    return None


def default_route_interface(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The interface of the default IPv4 route (destination 00000000), if any."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 1 and fields[1] == "00000000":
            return fields[0]
    return None


def efa_devices(root: Path = SYS_INFINIBAND) -> list[str]:
    """RDMA devices bound to the EFA kernel driver (named like rdmap16s27 on p4d / p5)."""
    if not root.is_dir():
        return []
    found = []
    for dev in sorted(root.iterdir()):
        driver = dev / "device" / "driver"
        if driver.exists() and driver.resolve().name == "efa":
            found.append(dev.name)
    return found


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str
    why: str


def recommended_env(efa: bool, gpus: bool, ifname: str | None) -> list[EnvVar]:
    """What triaxis sets on a node (the user's own value always wins, see `apply_env`)."""
    out: list[EnvVar] = []
    if ifname:
        out.append(
            EnvVar(
                "GLOO_SOCKET_IFNAME",
                ifname,
                "gloo binds the interface that reaches the rendezvous host, not the "
                "one the hostname resolves to",
            )
        )
        out.append(
            EnvVar(
                "NCCL_SOCKET_IFNAME",
                ifname,
                "NCCL's bootstrap (and its socket transport without EFA) uses the same interface",
            )
        )
    if efa:
        out.append(
            EnvVar("FI_PROVIDER", "efa", "libfabric must pick the EFA provider, not TCP sockets")
        )
        out.append(
            EnvVar(
                "FI_EFA_FORK_SAFE",
                "1",
                "data and checkpoint workers fork after memory is registered with the "
                "device (older libfabric corrupts memory otherwise)",
            )
        )
        if gpus:
            out.append(
                EnvVar(
                    "FI_EFA_USE_DEVICE_RDMA",
                    "1",
                    "GPUDirect RDMA: the NIC reads and writes GPU memory directly "
                    "(p4d, p5; needs nvidia_peermem)",
                )
            )
    return out


def apply_env(
    recommended: list[EnvVar], environ: MutableMapping[str, str] = os.environ
) -> tuple[dict[str, str], dict[str, str]]:
    """Set each recommended variable the user has not set. Returns (set, kept): what triaxis
    set, and the user's values it left alone (an explicit choice beats a recommendation)."""
    applied: dict[str, str] = {}
    kept: dict[str, str] = {}
    for var in recommended:
        if var.name in environ:
            kept[var.name] = environ[var.name]
        else:
            environ[var.name] = var.value
            applied[var.name] = var.value
    return applied, kept


def describe_applied(applied: dict[str, str], kept: dict[str, str]) -> str:
    """One log line: what the launcher set and what it kept from the user."""
    parts = [f"{k}={v}" for k, v in applied.items()]
    parts += [f"{k}={v} (yours, kept)" for k, v in kept.items()]
    return ", ".join(parts) if parts else "nothing"
