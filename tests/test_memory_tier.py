"""The in-memory checkpoint tier (issue 30): the keeper holds shards with checksums, survives its
clients, bounds its memory; every rank agrees on one tier and step."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.dist import run_workers
from triaxis.checkpoint import keeper, memory_tier
from triaxis.checkpoint.memory_tier import Choice


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(16, 8, generator=g)},
        "optim": {"step": torch.tensor(3), "exp_avg": torch.randn(16, 8, generator=g)},
        "loop": {"step": seed, "cursor": [1, 2, 3]},
        "rng": torch.get_rng_state(),
    }


def test_pack_round_trip_views_the_buffer_and_unpickles_nothing():
    s = {
        **_state(7),
        "bf16": torch.randn(3).bfloat16(),
        "none": None,
        4: (1, "x"),
        "e": torch.ones(0),
    }
    data = keeper.pack_state(s)
    back = keeper.unpack_state(data)
    for key in ("w",):
        assert torch.equal(back["model"][key], s["model"][key])
    assert torch.equal(back["optim"]["exp_avg"], s["optim"]["exp_avg"])
    assert back["optim"]["step"].dtype == torch.int64 and int(back["optim"]["step"]) == 3
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], s["bf16"])
    assert torch.equal(back["rng"], s["rng"]) and back["e"].shape == (0,)
    assert back["loop"] == s["loop"] and back[4] == [1, "x"] and back["none"] is None
    # No copy: the tensors are views of the buffer handed in.
    w = back["model"]["w"]
    base = torch.frombuffer(data, dtype=torch.uint8)
    assert base.data_ptr() <= w.data_ptr() < base.data_ptr() + len(data)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    import io

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    with pytest.raises(ValueError, match="not a triaxis raw state"):
        keeper.unpack_state(buf.getvalue())  # a pickle is refused unread
    with pytest.raises(TypeError, match="cannot pack a Evil"):
        keeper.pack_state({"x": Evil()})


def test_store_keeps_last_k_bounds_bytes_and_rejects_bad_checksum(tmp_path):
    store = keeper.ShardStore(str(tmp_path), keep=2, max_bytes=1000)
    for step in (10, 20, 30):
        data = bytes([step]) * 100
        assert store.put(step, 0, data, keeper._digest(data)) is None
    assert sorted(store.steps()) == [20, 30]  # step 10 evicted
    big = b"x" * 2000
    assert "max_bytes" in store.put(40, 0, big, keeper._digest(big))
    assert store.held_bytes() <= 1000
    assert "checksum" in store.put(50, 0, b"abc", 123)
    store.corrupt(30, 0)
    assert store.get(30, 0) is None and bytes(store.get(20, 0)) == bytes([20]) * 100
    # Evicted and refused shards leave no file behind: only the two held steps are on disk.
    assert sorted(os.listdir(tmp_path)) == ["20-0.raw", "30-0.raw", "incoming"]
    assert os.listdir(tmp_path / "incoming") == []
    outside = tmp_path / "elsewhere"
    outside.write_bytes(b"abc")
    assert "is not a file in" in store.adopt(60, 0, str(outside), keeper._digest(b"abc"))


def test_keeper_process_outlives_a_killed_client_and_detects_corruption(tmp_path):
    path = str(tmp_path / "k.sock")
    proc = keeper.start(path, keep=2, max_bytes=1 << 24)
    try:
        client = keeper.KeeperClient(path)
        data = {r: keeper.pack_state(_state(r)) for r in range(2)}
        # A worker that hands its shard over and then dies by SIGKILL.
        pid = os.fork()
        if pid == 0:
            try:
                keeper.KeeperClient(path).put(5, 1, data[1])
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        assert client.put(5, 0, data[0]) is None
        assert client.steps() == {5: [0, 1]}
        back = keeper.unpack_state(client.get(5, 1))
        assert torch.equal(back["model"]["w"], _state(1)["model"]["w"])
        assert client.corrupt(5, 1) and client.get(5, 1) is None  # corrupted -> next tier
        assert bytes(client.get(5, 0)) == bytes(data[0])
        # Written in place (no bytes through the socket), read back as a map of the file.
        assert client.put_state(6, 0, _state(0)) is None
        back = client.get_state(6, 0)
        assert torch.equal(back["optim"]["exp_avg"], _state(0)["optim"]["exp_avg"])
    finally:
        proc.kill()
        proc.wait()
    gone = keeper.KeeperClient(path, timeout_s=5)
    assert gone.steps() is None and gone.get(5, 0) is None  # keeper gone -> durable
    assert "not reachable" in gone.put(6, 0, b"x")


@pytest.mark.parametrize(
    ("per_rank", "durable", "want"),
    [
        ([[10, 20], [10, 20]], 5, Choice("memory", 20)),
        ([[10, 20], [10]], 5, Choice("memory", 10)),  # 20 is not on every rank
        ([[10, 20], [-1, -1]], 5, Choice("durable", 5)),  # one keeper lost everything
        ([[10], [10]], 10, Choice("memory", 10)),
        ([[10], [10]], 15, Choice("durable", 15)),
        ([[-1], [-1]], None, Choice("none", -1)),
    ],
)
def test_choose(per_rank, durable, want):
    assert memory_tier.choose(per_rank, durable) == want


def _agree_worker(rank, world):
    local = [[30, 20, 10], [20, 10]][rank]
    from triaxis.parallel.host import new_host_group

    group = new_host_group("memory-tier")
    return memory_tier.agree(local, durable_step=[10, 10][rank], keep=3, group=group)


def test_agree_every_rank_same_choice():
    results = run_workers(_agree_worker, 2)
    assert results == [Choice("memory", 20), Choice("memory", 20)]


def test_check_fits_one_line_error():
    gib = 1 << 30
    memory_tier.check_fits(gib, 8, 2, host_bytes=64 * gib)  # 24 GiB of 64: fits
    from triaxis.errors import UserError

    with pytest.raises(UserError) as e:
        memory_tier.check_fits(gib, 8, 4, host_bytes=64 * gib)  # 40 GiB of 64: over half
    msg = str(e.value)
    assert "\n" not in msg and "memory_keep=4" in msg and "40.0 GiB" in msg


def test_written_file_equals_the_packed_bytes_and_evicted_shards_are_recycled(tmp_path):
    import os

    from triaxis.checkpoint import rawstate

    s = _state(0)
    store = keeper.ShardStore(str(tmp_path), keep=1, max_bytes=1 << 24, recycle=True)
    for step in (1, 2, 3):
        path = os.path.join(store.incoming, f"{step}-0")
        if step == 3:  # what put_state does: claim the spare, write over it (a larger state)
            os.replace(os.path.join(store.incoming, "spare-0"), path)
            s = {**s, "extra": torch.ones(300)}
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        rawstate.write_to_file(s, fd)
        os.close(fd)
        data = open(path, "rb").read()
        assert data == bytes(keeper.pack_state(s))
        assert store.adopt(step, 0, path, keeper._digest(data)) is None
        # keep=1: each step from the second evicts the one before into the spare
        assert os.path.exists(os.path.join(store.incoming, "spare-0")) == (step > 1)
        assert torch.equal(keeper.unpack_state(store.get(step, 0))["model"]["w"], s["model"]["w"])
