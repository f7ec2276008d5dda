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


def test_pack_round_trip_and_restricted_loader():
    s = _state(7)
    back = keeper.unpack_state(keeper.pack_state(s))
    assert torch.equal(back["model"]["w"], s["model"]["w"]) and back["loop"] == s["loop"]

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    import io
    import pickle

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    with pytest.raises(pickle.UnpicklingError):
        keeper.unpack_state(buf.getvalue())


def test_store_keeps_last_k_bounds_bytes_and_rejects_bad_checksum():
    store = keeper.ShardStore(keep=2, max_bytes=1000)
    for step in (10, 20, 30):
        data = bytes([step]) * 100
        assert store.put(step, 0, data, keeper._digest(data)) is None
    assert sorted(store.steps()) == [20, 30]  # step 10 evicted
    big = b"x" * 2000
    assert "max_bytes" in store.put(40, 0, big, keeper._digest(big))
    assert store.held_bytes() <= 1000
    assert "checksum" in store.put(50, 0, b"abc", 123)
    store.corrupt(30, 0)
    assert store.get(30, 0) is None and store.get(20, 0) == bytes([20]) * 100


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
        assert client.get(5, 0) == data[0]
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
