"""Local shards against their manifest: sha256 and token range read once per file (then
remembered until the file changes), sizes on every open, `data.verify=size` for sizes only."""

import shutil

import pytest

import triaxis.data.verify as verify
from triaxis.data.dataset import TokenDataset
from triaxis.errors import UserError


@pytest.fixture
def data(byte_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TRIAXIS_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "d"
    shutil.copytree(byte_data, copy)
    return copy


def count_hashes(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = verify._hash_and_max

    def counting(path, dtype):
        hashed.append(path.name)
        return real(path, dtype)

    monkeypatch.setattr(verify, "_hash_and_max", counting)
    return hashed


def test_each_shard_is_hashed_once_until_it_changes(data, monkeypatch):
    hashed = count_hashes(monkeypatch)
    TokenDataset(data, "train", 32)
    shards = sorted(p.name for p in data.glob("train_*.bin"))
    assert sorted(hashed) == shards and len(shards) > 1
    TokenDataset(data, "train", 32)  # a second run, or another rank: no re-hash
    assert sorted(hashed) == shards
    shard = data / shards[1]
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0x01  # same size: only the checksum tells
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"{shards[1]} fails its sha256 check"):
        TokenDataset(data, "train", 32)
    assert hashed.count(shards[1]) == 2 and hashed.count(shards[0]) == 1
    # verify=size trusts the content (and reads none of it), but not the sizes.
    TokenDataset(data, "train", 32, verify="size")
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(UserError, match=f"{shards[1]} has .* bytes but the manifest says"):
        TokenDataset(data, "train", 32, verify="size")


def test_unwritable_cache_only_costs_a_rehash(data, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("TRIAXIS_CACHE_DIR", str(tmp_path / "file"))
    hashed = count_hashes(monkeypatch)
    TokenDataset(data, "train", 32)
    TokenDataset(data, "train", 32)
    assert len(hashed) == 2 * len(list(data.glob("train_*.bin")))
