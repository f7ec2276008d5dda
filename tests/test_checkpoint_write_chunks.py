"""The checksumming writer hashes a large write chunk by chunk, right after each chunk is
written (integrity._HOT), so the hash reads bytes still in the cache instead of making a second
pass over a whole tensor; the recorded checksums stay those of the bytes on disk."""

from __future__ import annotations

import io

import torch
import torch.distributed.checkpoint as dcp

from triaxis.checkpoint import checksum, dcp_io, integrity


class _Recording(io.RawIOBase):
    """A raw file that keeps what reaches it and the size of each write; `short` caps each
    write's size (a short write)."""

    def __init__(self, short: int | None = None):
        super().__init__()
        self.data, self.sizes, self.short = bytearray(), [], short

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = len(mv) if self.short is None else min(len(mv), self.short)
        self.data += mv[:n]
        self.sizes.append(n)
        return n


def test_a_large_write_reaches_the_file_in_chunks_each_hashed(monkeypatch):
    monkeypatch.setattr(integrity, "_HOT", 1 << 10)
    raw, got = _Recording(), {}
    stream = integrity._HashingStream(raw, lambda size, items: got.update(size=size, items=items))
    payload = bytes(range(256)) * 33  # 8,448 bytes: eight full chunks and a partial one
    assert stream.write(b"head") == 4
    stream.tell()  # an item boundary, as DCP asks
    assert stream.write(payload) == len(payload)
    stream.close()
    assert raw.sizes == [4] + [1 << 10] * 8 + [256]
    assert bytes(raw.data) == b"head" + payload
    assert got["size"] == 4 + len(payload)
    assert got["items"] == [
        [0, 4, checksum.digest(checksum.WRITE, b"head")],
        [4, len(payload), checksum.digest(checksum.WRITE, payload)],
    ]


def test_a_short_write_hashes_and_counts_only_what_was_written(monkeypatch):
    monkeypatch.setattr(integrity, "_HOT", 1 << 10)
    raw, got = _Recording(short=100), {}
    stream = integrity._HashingStream(raw, lambda size, items: got.update(size=size, items=items))
    data = b"z" * 5000
    written = 0
    while written < len(data):  # what a BufferedWriter does with a short raw write
        written += stream.write(data[written:])
    stream.close()
    assert bytes(raw.data) == data and got["size"] == len(data)
    assert got["items"] == [[0, len(data), checksum.digest(checksum.WRITE, data)]]


def test_a_checkpoint_of_tensors_larger_than_a_chunk_verifies(tmp_path, monkeypatch):
    """Through DCP: the items of tensors written in many chunks carry the checksum of their
    bytes in the file, so the checkpoint loads verified."""
    monkeypatch.setattr(integrity, "_HOT", 1 << 12)
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(128, 64, generator=g), "b": torch.randn(3000, generator=g)}
    writer = dcp_io.writer(str(tmp_path))
    dcp.save(state, storage_writer=writer)
    shard = (tmp_path / "__0_0.distcp").read_bytes()
    items = writer.digests["__0_0.distcp"]["items"]
    assert len(shard) == writer.digests["__0_0.distcp"]["size"]
    for start, length, want in items:
        assert checksum.digest(checksum.WRITE, shard[start : start + length]) == want
    out = {"w": torch.zeros(128, 64), "b": torch.zeros(3000)}
    dcp_io.load(out, str(tmp_path), writer.digests)
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])
