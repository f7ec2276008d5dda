"""The buddy replica on loopback: two keepers as two nodes. Each shard a keeper adopts reaches
the next node's buddy server in the background; a replacement node's rank fetches it back,
checksum-checked; a wrong token, a corrupted replica and a buddy that is gone all read as
"not there", and the replica store keeps its byte bound."""

from __future__ import annotations

import time

import pytest
import torch

from tests.dist import WAIT_S
from triaxis.checkpoint import buddy, keeper

TOKEN = "t0ken"


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 32, generator=g)}, "train": {"step": seed}}


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIAXIS_BUDDY_TOKEN", TOKEN)
    procs, nodes = [], []
    for name in ("a", "b"):
        path = str(tmp_path / f"{name}.sock")
        procs.append(keeper.start(path, keep=2, max_bytes=1 << 24, buddy_listen="127.0.0.1:0"))
        nodes.append(keeper.KeeperClient(path))
    a, b = nodes
    assert a.set_peer(b.buddy_address()) is None and b.set_peer(a.buddy_address()) is None
    yield a, b
    for p in procs:
        p.kill()
        p.wait()


def _wait_for(fn):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow  # two keeper processes (each imports torch)
def test_shards_reach_the_next_node_and_come_back(two_nodes):
    a, b = two_nodes
    for step in (1, 2, 3):
        assert a.put_state(step, 0, _state(step)) is None
    at_b = b.buddy_address()
    assert _wait_for(lambda: 3 in buddy.replica_steps(at_b, TOKEN, 0))
    data = buddy.fetch(at_b, TOKEN, 3, 0)
    assert data is not None and bytes(data) == bytes(a.get(3, 0))
    back = keeper.unpack_state(data)
    assert torch.equal(back["model"]["w"], _state(3)["model"]["w"])
    # keep=2 there too; a step superseded before its push may be skipped (newest first)
    held = buddy.replica_steps(at_b, TOKEN, 0)
    assert held[-1] == 3 and len(held) <= 2
    assert buddy.replica_steps(at_b, TOKEN, 1) == []  # another rank: none held
    # The replacement node puts what it fetched into its own (empty) keeper, as a restore does.
    assert b.put(3, 0, data) is None and b.get_state(3, 0)["train"]["step"] == 3


@pytest.mark.slow
def test_wrong_token_reads_nothing(two_nodes):
    a, b = two_nodes
    assert a.put_state(5, 0, _state(5)) is None
    at_b = b.buddy_address()
    assert _wait_for(lambda: buddy.replica_steps(at_b, TOKEN, 0))
    assert buddy.replica_steps(at_b, "guess", 0) == []
    assert buddy.fetch(at_b, "guess", 5, 0) is None


def test_corrupted_replica_and_gone_buddy_read_as_missing(tmp_path):
    server = buddy.BuddyServer("127.0.0.1:0", TOKEN, str(tmp_path / "r"), keep=2, max_bytes=12000)
    data = keeper.pack_state(_state(1))
    assert server.store.put(7, 0, data, keeper._digest(data)) is None
    assert buddy.fetch(server.address, TOKEN, 7, 0) is not None
    server.store.corrupt(7, 0)
    assert buddy.fetch(server.address, TOKEN, 7, 0) is None
    # Past the byte bound: refused, nothing evicted.
    big = keeper.pack_state({"w": torch.zeros(2048)})
    reply = buddy._call(
        server.address,
        {"op": "replica_put", "token": TOKEN, "step": 8, "rank": 0, "digest": keeper._digest(big)},
        big,
    )
    assert reply is not None and "max_bytes" in reply[0]["error"]
    assert server.store.steps() == {7: [0]}
    server.server.shutdown()
    server.server.server_close()
    t0 = time.monotonic()
    assert buddy.fetch(server.address, TOKEN, 7, 0) is None  # gone: refused at once
    assert buddy.replica_steps(server.address, TOKEN, 0) == []
    assert time.monotonic() - t0 < buddy.CONNECT_TIMEOUT_S * 2 + 30
