"""The checksum each checkpoint names, old checkpoints verified with theirs, and resume in place.

tests/fixtures/crc32_checkpoint was written by main at 0f9a4a6 (before the manifest named its
checksum: CRC-32 items, no "checksum" key) with dcp_io.writer + manifest.commit of
{"w": randn(64, 32) from seed 0, "b": arange(7), "step": 3}."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from triaxis.checkpoint import checksum, dcp_io
from triaxis.checkpoint import manifest as mf
from triaxis.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "crc32_checkpoint"


def _fixture_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.arange(7.0), "step": 3}


def _write_new(path: str) -> None:
    """The fixture state as a committed checkpoint of the current format."""
    writer = dcp_io.writer(path)
    dcp.save(_fixture_state(), storage_writer=writer)
    mf.write_sidecar(path, 0, writer.digests)
    mf.commit(path, 1, {"step": 3})


def _load(path: str, meta: dict) -> dict:
    out = {"w": torch.zeros(64, 32), "b": torch.zeros(7), "step": 0}
    files = dcp_io.expected_files(meta)
    dcp_io.load(out, path, files, algorithm=checksum.of_manifest(meta))
    return out


def test_a_crc32_checkpoint_of_the_old_format_verifies_and_loads(tmp_path):
    path = tmp_path / "old"
    shutil.copytree(FIXTURE, path)
    meta = mf.load_manifest(str(path))
    assert "checksum" not in meta and checksum.of_manifest(meta) == "crc32"
    assert mf.verify(str(path)) == []
    got, want = _load(str(path), meta), _fixture_state()
    assert torch.equal(got["w"], want["w"]) and torch.equal(got["b"], want["b"])
    assert got["step"] == 3
    shard = path / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    start, length, _ = max(meta["files"][shard.name]["items"], key=lambda it: it[1])
    raw[start + length // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert any("fails its checksum" in p for p in mf.verify(str(path)))
    with pytest.raises(UserError, match="__0_0.distcp fails its checksum"):
        _load(str(path), meta)


def test_new_checkpoints_name_their_checksum_and_record_it_per_item(tmp_path):
    path = str(tmp_path / "new")
    _write_new(path)
    meta = mf.load_manifest(path)
    assert meta["checksum"] == checksum.WRITE == "xxh3_64"
    raw = (tmp_path / "new" / "__0_0.distcp").read_bytes()
    for start, length, digest in meta["files"]["__0_0.distcp"]["items"]:
        assert digest == checksum.digest("xxh3_64", raw[start : start + length])
    assert mf.verify(path) == []
    assert _load(path, meta)["step"] == 3
    # A name this code does not know makes the checkpoint invalid, never unverified.
    meta["checksum"] = "md4"
    (tmp_path / "new" / mf.META).write_text(json.dumps(meta))
    _, problems = mf.check(path)
    assert problems == ["its checksum 'md4' is not one this triaxis knows"]


class _Log:
    def info(self, msg: str) -> None:
        pass

    warn = info


def _checkpointer(root: str):
    from triaxis.checkpoint.dcp import Checkpointer
    from triaxis.config import CheckpointConfig
    from triaxis.model.llama import ModelArgs, Transformer

    args = ModelArgs(
        dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=16
    )
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize("cpu")
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = CheckpointConfig(dir=root, keep_last=0, async_save=False)
    return Checkpointer(root, model, opt, sched, args, {}, cfg, 0, 1, {}, _Log())


def _snapshot(ck) -> dict:
    model = {k: v.clone() for k, v in ck.model.state_dict().items()}
    optim = [
        {k: v.clone() for k, v in s.items()}
        for s in (ck.optimizer.state[p] for p in ck.model.parameters())
    ]
    return {"model": model, "optim": optim}


def test_resume_restores_the_state_in_place_without_a_second_copy(tmp_path, monkeypatch):
    """The load writes straight into the parameters and AdamW moments, as plain DCP does;
    set_state_dict (a second copy of everything) is not called."""
    from triaxis.checkpoint import dcp_load as ckdcp

    ck = _checkpointer(str(tmp_path / "ck"))
    ck.save(1, 10, block=True)
    saved = _snapshot(ck)
    with torch.no_grad():
        for p in ck.model.parameters():
            p.add_(1.0)
            for v in ck.optimizer.state[p].values():
                v.mul_(3.0)

    def refuse(*a, **k):
        raise AssertionError("set_state_dict copied the state a second time")

    monkeypatch.setattr(ckdcp, "set_state_dict", refuse)
    got = ck.load(mf.step_dir(str(tmp_path / "ck"), 1))
    assert got["step"] == 1 and got["cursor"] == 10
    now = _snapshot(ck)
    assert all(torch.equal(now["model"][k], v) for k, v in saved["model"].items())
    for a, b in zip(now["optim"], saved["optim"], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_state_the_load_could_not_write_in_place_is_put_in_place():
    """loaded_in_place is what lets resume skip set_state_dict: a copied tensor or a value
    DCP replaced is not in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from triaxis.checkpoint.dcp_io import loaded_in_place

    ck = _checkpointer("unused")
    model_sd, optim_sd = get_state_dict(ck.model, ck.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    assert loaded_in_place(state, ck.model, ck.optimizer)
    first = next(iter(model_sd))
    state["model"][first] = model_sd[first].clone()
    assert not loaded_in_place(state, ck.model, ck.optimizer)
    state["model"][first] = ck.model.state_dict()[first]
    fqn = next(iter(optim_sd["state"]))
    optim_sd["state"][fqn]["step"] = 5.0
    assert not loaded_in_place(state, ck.model, ck.optimizer)


def test_resume_verifies_a_crc32_checkpoint_with_crc32(tmp_path):
    """A training checkpoint in main's format (CRC-32 items, no "checksum" key; rewritten here
    from a new one) resumes, and a flipped byte in it is refused."""
    import zlib

    ck = _checkpointer(str(tmp_path / "ck"))
    ck.save(1, 10, block=True)
    path = Path(mf.step_dir(str(tmp_path / "ck"), 1))
    meta = json.loads((path / mf.META).read_text())
    del meta["checksum"]
    for name, entry in meta["files"].items():
        raw = (path / name).read_bytes()
        entry["items"] = [[o, n, zlib.crc32(raw[o : o + n])] for o, n, _ in entry["items"]]
    (path / mf.META).write_text(json.dumps(meta))
    assert mf.verify(str(path)) == []
    assert ck.load(str(path))["cursor"] == 10
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    start, length, _ = max(meta["files"][shard.name]["items"], key=lambda it: it[1])
    raw = bytearray(shard.read_bytes())
    raw[start + length // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="fails its checksum"):
        ck.load(str(path))


@pytest.mark.parametrize("flip", [None, "first", "last"])
def test_a_tensor_read_in_many_chunks_verifies_every_chunk(tmp_path, monkeypatch, flip):
    """Large reads are hashed chunk by chunk (integrity._HOT): with the chunk shrunk to 1 KiB
    the 8 KiB tensor takes eight, and a byte flipped in the first or the last is refused."""
    from triaxis.checkpoint import integrity

    monkeypatch.setattr(integrity, "_HOT", 1 << 10)
    path = str(tmp_path / "new")
    _write_new(path)
    meta = mf.load_manifest(path)
    if flip is None:
        assert torch.equal(_load(path, meta)["w"], _fixture_state()["w"])
        return
    shard = Path(path) / "__0_0.distcp"
    start, length, _ = max(meta["files"][shard.name]["items"], key=lambda it: it[1])
    raw = bytearray(shard.read_bytes())
    at = start + length - 100 if flip == "last" else start + 1200  # inside w's 8 KiB of data
    raw[at] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="__0_0.distcp fails its checksum"):
        _load(path, meta)


def test_a_write_that_failed_records_no_checksum_even_when_collected_later(tmp_path):
    """A save attempt that fails mid-file (a storage outage) is retried; the failed attempt's
    stream, collected after the retry wrote the whole file, must not overwrite its record
    with the partial size (a flaky S3 outage test caught exactly that)."""
    import gc

    writer = dcp_io.writer(str(tmp_path))
    with pytest.raises(OSError):
        with writer.fs.create_stream(tmp_path / "part.distcp", "wb") as stream:
            stream.write(b"x" * 10)
            raise OSError("the store went away")
    with writer.fs.create_stream(tmp_path / "part.distcp", "wb") as retry:
        retry.write(b"y" * 25)
    del stream, retry
    gc.collect()
    assert writer.digests["part.distcp"]["size"] == 25
