"""Several hosts on one machine, for multi-node tests: network namespaces joined by a bridge.

Each host is a network namespace with its own interface `eth0` and address on a private /24,
and runs its commands under its own hostname (a UTS namespace). The bridge sits in a namespace
of its own that also serves as the "login node" (address .254). The addresses exist only inside
these namespaces: nothing is routed to or from the machine's own namespace, and the tests use
them only from inside. Commands enter a namespace with `nsenter --net` (`ip netns exec`
remounts /sys, which breaks slurmd).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

SUBNET = "10.213.7"


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str

    def prefix(self, own_hostname: bool = True) -> list[str]:
        """argv prefix that runs a command inside this host."""
        cmd = ["nsenter", f"--net=/run/netns/{self.netns}"]
        if own_hostname:
            cmd += ["unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh"]
        return cmd


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux)"
    probe = f"txprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"cannot create a network namespace: {e.stderr.decode().strip()}"
    _ip("netns", "del", probe)
    return None


class HostNetwork:
    """Context manager: hosts named `names` on one bridge, plus the login namespace `login`."""

    def __init__(self, names: list[str], tag: str = "t"):
        base = f"tx{os.getpid() % 100000}{tag}"
        self.login = Host("login", f"{base}_login", f"{SUBNET}.254")
        self.hosts = [Host(n, f"{base}_{n}", f"{SUBNET}.{i + 1}") for i, n in enumerate(names)]
        self._made: list[str] = []

    def __enter__(self) -> HostNetwork:
        try:
            self._create()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _create(self) -> None:
        login = self.login.netns
        _ip("netns", "add", login)
        self._made.append(login)
        _ip("-n", login, "link", "set", "lo", "up")
        _ip("-n", login, "link", "add", "br0", "type", "bridge")
        _ip("-n", login, "addr", "add", f"{self.login.address}/24", "dev", "br0")
        _ip("-n", login, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts):
            _ip("netns", "add", h.netns)
            self._made.append(h.netns)
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip(
                "link",
                "add",
                "eth0",
                "netns",
                h.netns,
                "type",
                "veth",
                "peer",
                "name",
                f"v{i}",
                "netns",
                login,
            )
            _ip("-n", login, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", login, "link", "set", f"v{i}", "up")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "up")

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self._made):  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
