"""Context parallelism across hosts: two hosts (network namespaces, their own address and
hostname), one rank each, the cp group spanning both, so every ring hop of K/V and of the
gradient accumulators crosses the network; the run has the single-process losses."""

import pytest

from tests.helpers import losses
from tests.netns_hosts import HostNetwork, unavailable_reason
from tests.test_multinode import PORT, finish, launch_on, reference_losses, train_args

_reason = unavailable_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]


@pytest.fixture(scope="module")
def hosts():
    with HostNetwork(["cphost0", "cphost1"], tag="c") as net:
        yield net.hosts


def test_cp_spanning_two_hosts_matches_one_process(hosts, byte_data, tmp_path):
    node0, node1 = hosts
    layout = ["--parallel.cp=2", "--parallel.dp_shard=1"]
    common = ["--backend", "torchrun", "--nnodes", "2", "--nproc-per-node", "1"]
    common += ["--rdzv-endpoint", f"{node0.address}:{PORT}", "--rdzv-timeout", "120"]
    run = tmp_path / "cp_hosts"
    procs = [launch_on(h, *common, *train_args(byte_data, run, *layout)) for h in (node1, node0)]
    want = reference_losses(byte_data, tmp_path / "ref")
    out1, out0 = (finish(p, 300) for p in procs)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, out0[-3000:] + out1[-3000:]
    # One rank per host: the cp group (ranks 0 and 1) is the two hosts.
    assert "cp=2" in out0 and f"is_host=false --local-addr={node1.address}" in out1
    got = losses(run)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
