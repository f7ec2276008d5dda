"""The memory tier across two hosts (network namespaces), each running its keeper as a node
daemon (TRIAXIS_KEEPER_SOCKET) with a buddy server. node1 is lost with its keeper; the job is
relaunched with a replacement node1 (a fresh, empty keeper) in a new `--nnodes 2` rendezvous.
node0's rank restores from its own keeper, node1's from the buddy replica node0's keeper holds.
No durable checkpoint exists before the end, so only the memory tier can resume the run; every
step's loss then equals the uninterrupted single-process run's."""

import subprocess
import sys
import time

import pytest

from tests.helpers import command, losses
from tests.netns_hosts import HostNetwork, unavailable_reason
from tests.test_multinode import ENV, PORT, finish, kill_host, reference_losses, train_args
from triaxis.checkpoint import keeper

_reason = unavailable_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]
STEPS = 16
TOKEN = {"TRIAXIS_BUDDY_TOKEN": "test-job-token"}


@pytest.fixture(scope="module")
def hosts():
    with HostNetwork(["node0", "node1"], tag="b") as net:
        yield net.hosts


def _daemon(host, socket_path: str) -> subprocess.Popen:
    """This host's keeper, as a node daemon would run it (its buddy server on the host's
    address, any free port)."""
    argv = [
        sys.executable, "-m", "triaxis.checkpoint.keeper", "--socket", socket_path, "--keep", "3",
        "--max-bytes", str(1 << 28), "--buddy-listen", f"{host.address}:0",
    ]  # fmt: skip
    proc = subprocess.Popen(host.prefix() + argv, env={**ENV, **TOKEN})
    deadline = time.monotonic() + 120
    while keeper.KeeperClient(socket_path, timeout_s=5).steps() is None:
        assert proc.poll() is None and time.monotonic() < deadline, "keeper did not start"
        time.sleep(0.1)
    return proc


def _launch(host, socket_path: str, args) -> subprocess.Popen:
    # Slow steps: the kill lands mid-run on a fast machine too.
    env = {
        **ENV,
        **TOKEN,
        "TRIAXIS_KEEPER_SOCKET": socket_path,
        "TRIAXIS_FAULT_STEP_DELAY_S": "0.3",
    }
    return subprocess.Popen(
        host.prefix() + command("launch", *map(str, args)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_replaced_node_restores_from_its_buddy(hosts, byte_data, tmp_path):
    node0, node1 = hosts
    run = tmp_path / "run"
    sockets = [str(tmp_path / "k0.sock"), str(tmp_path / "k1.sock")]

    def args(attempt: int) -> list:
        return [
            "--backend", "torchrun", "--nnodes", 2, "--nproc-per-node", 1,
            "--rdzv-endpoint", f"{node0.address}:{PORT + 5 + attempt}", "--rdzv-timeout", 120,
            *train_args(
                byte_data, run, f"--train.steps={STEPS}", "--checkpoint.interval=0",
                "--checkpoint.memory_interval=1", "--checkpoint.memory_keep=3",
            ),
        ]  # fmt: skip

    daemons = [_daemon(h, s) for h, s in zip(hosts, sockets)]
    try:
        first = [_launch(h, s, args(0)) for h, s in zip(hosts, sockets)]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first[0].poll() is None:
            if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= 6:
                break
            time.sleep(0.1)
        kill_host(node1)  # the host is lost: its launcher, worker and keeper (and its memory)
        for p in (*first, daemons[1]):
            p.communicate(timeout=300)
        assert first[0].returncode != 0  # node0's worker lost its peer: the job failed
        daemons[1] = _daemon(node1, sockets[1])  # the replacement host: an empty keeper
        assert keeper.KeeperClient(sockets[1]).steps() == {}
        second = [_launch(h, s, args(1)) for h, s in zip(hosts, sockets)]
        out0, out1 = finish(second[0], 400), finish(second[1], 120)
    finally:
        for d in daemons:
            d.kill()
            d.wait()
    assert second[0].returncode == 0 and second[1].returncode == 0, (
        out0[-4000:] + "\n-- node1:\n" + out1[-4000:]
    )
    restored = [line for line in out0.splitlines() if "restored from the memory tier" in line]
    assert restored, out0[-4000:]
    assert "the keeper on this node: ranks [0]" in restored[-1], restored
    assert f"the buddy replica at {node0.address}:" in restored[-1] and "ranks [1]" in restored[-1]
    want = reference_losses(byte_data, tmp_path / "ref", f"--train.steps={STEPS}")
    got = losses(run)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
