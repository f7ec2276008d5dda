"""MiCS hierarchical gathers across two real hosts (network namespaces, each its own address
and hostname): torchrun 2 nodes x 2 processes, one dp_shard=4 group over both nodes. The two-phase
run, the flat run and one process train to the same losses."""

import pytest

from tests.helpers import losses
from tests.netns_hosts import HostNetwork, unavailable_reason
from tests.test_multinode import finish, launch_on, reference_losses, train_args

_reason = unavailable_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]
PORT = 29410


@pytest.fixture(scope="module")
def hosts():
    with HostNetwork(["node0", "node1"], tag="h") as net:
        yield net.hosts


def _two_nodes(hosts, data, run, mode: str, port: int) -> str:
    node0, node1 = hosts
    common = [
        "--backend",
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--rdzv-endpoint",
        f"{node0.address}:{port}",
        "--rdzv-timeout",
        "120",
    ]
    layout = ["--parallel.dp_shard=4", f"--parallel.hierarchical={mode}"]
    procs = [launch_on(h, *common, *train_args(data, run, *layout)) for h in (node1, node0)]
    out1, out0 = (finish(p, 300) for p in procs)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, out0[-3000:] + out1[-3000:]
    return out0


def test_two_hosts_hierarchical_matches_flat_and_one_process(hosts, byte_data, tmp_path):
    out_on = _two_nodes(hosts, byte_data, tmp_path / "on", "auto", PORT)  # the default
    out_off = _two_nodes(hosts, byte_data, tmp_path / "off", "off", PORT + 1)
    want = reference_losses(byte_data, tmp_path / "ref")
    # torchrun's LOCAL_WORLD_SIZE=2 on each host: the group of 4 spans 2 nodes x 2 ranks, so
    # auto turns the two-phase collectives on.
    line = "each dp_shard group spans 2 nodes x 2 ranks"
    assert line in out_on and line not in out_off
    assert sorted(want) == [1, 2, 3, 4]
    for mode in ("on", "off"):
        got = losses(tmp_path / mode)
        assert sorted(got) == sorted(want), mode
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (mode, step)
