"""A rank's staged state as raw bytes: a JSON index, then each tensor's bytes, nothing pickled.

    b"TXRAW1\\n" | u64 index length | index (JSON) | pad to 64 | tensor bytes, each 64-aligned

The index is the state's tree with every tensor replaced by {"__t": i} (its dtype, shape and
offset in "tensors"); dicts become {"__d": [[key, value], ...]} so int keys survive, tuples come
back as lists. Reading it back runs no code from the bytes (json + torch.frombuffer): what another
process wrote can only yield tensors, numbers, strings, lists and dicts.

unpack_state returns tensors that view the buffer it was given (no copy): the restore copies
them once, into the live model and optimizer. Keep the buffer alive while they are used."""

from __future__ import annotations

import json
import os
import struct

import torch

MAGIC = b"TXRAW1\n"
_ALIGN = 64
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
        torch.float8_e4m3fn, torch.float8_e5m2,
    )
}  # fmt: skip


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _tree(value, tensors: list[torch.Tensor]):
    if isinstance(value, torch.Tensor):
        # A GPU tensor is copied straight into the buffer (pack_into): no staging copy first.
        if type(value) is not torch.Tensor:
            raise TypeError(
                f"rawstate packs plain tensors (a DTensor's local shard), not "
                f"{type(value).__name__}"
            )
        tensors.append(value)
        return {"__t": len(tensors) - 1}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str | int):
                raise TypeError(f"rawstate: dict key {k!r} is not a str or an int")
        return {"__d": [[k, _tree(v, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_tree(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"rawstate cannot pack a {type(value).__name__}")


def plan(state: dict) -> tuple[bytes, list[tuple[torch.Tensor, int]], int]:
    """(header bytes, [(tensor, offset)], total size) of `state` packed."""
    tensors: list[torch.Tensor] = []
    tree = _tree(state, tensors)
    entries, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"rawstate: dtype {t.dtype} is not supported")
        entries.append({"dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": nbytes})
        offset = _align(offset + nbytes)
    index = json.dumps({"tree": tree, "tensors": entries}).encode()
    header = MAGIC + struct.pack("<Q", len(index)) + index
    start = _align(len(header))
    header += b"\0" * (start - len(header))
    return header, [(t, start + e["offset"]) for t, e in zip(tensors, entries)], start + offset


def pack_into(state: dict, buf) -> int:
    """Write `state` into the writable buffer `buf` (bytearray, mmap), which must hold
    packed_size(state) bytes; returns that size."""
    header, placed, total = plan(state)
    view = memoryview(buf).cast("B")
    if len(view) < total:
        raise ValueError(f"buffer of {len(view)} bytes cannot hold {total}")
    view[: len(header)] = header
    whole = torch.frombuffer(buf, dtype=torch.uint8, count=total) if total else None
    for t, off in placed:
        n = t.numel() * t.element_size()
        if n:
            src = t.detach().contiguous().reshape(-1).view(torch.uint8)
            whole[off : off + n].copy_(src)  # type: ignore[index]
    return total


def write_to_file(state: dict, fd: int, hasher=None) -> int:
    """Write `state` packed into the open file `fd` (truncated or grown to its size) with
    pwrite: the kernel copies each tensor's bytes into the file's pages, which on a tmpfs is
    about twice as fast as faulting in a fresh mapping, and five times into a reused file
    whose pages exist already. `hasher` (an object with .update) sees every byte of the file
    in order, from the sources: no second pass over the written file. Returns the size."""
    header, placed, total = plan(state)
    os.ftruncate(fd, total)
    _pwrite_all(fd, memoryview(header), 0, hasher)
    end = len(header)
    for t, off in placed:
        # The alignment gaps are zeroed too: a reused file holds the same bytes as pack_state.
        _pwrite_all(fd, memoryview(bytes(off - end)), end, hasher)
        end = off + t.numel() * t.element_size()
        if t.numel():
            src = t.detach().contiguous().reshape(-1).view(torch.uint8)
            if src.device.type != "cpu":
                src = src.cpu()  # a device tensor: through one host copy of itself
            _pwrite_all(fd, memoryview(src.numpy()), off, hasher)
    _pwrite_all(fd, memoryview(bytes(total - end)), end, hasher)
    return total


def _pwrite_all(fd: int, view: memoryview, offset: int, hasher=None) -> None:
    view = view.cast("B")
    if hasher is not None:
        hasher.update(view)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def pack_state(state: dict) -> bytearray:
    """`state` (tensors, numbers, strings, nested dicts/lists) as one buffer."""
    _, _, total = plan(state)
    buf = bytearray(total)
    pack_into(state, buf)
    return buf


def unpack_state(data) -> dict:
    """The state packed in `data` (bytes, bytearray, mmap, memoryview); tensors view `data`."""
    view = memoryview(data).cast("B")
    if view.readonly:  # torch.frombuffer needs a writable buffer; small replies come as bytes
        view = memoryview(bytearray(view))
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise ValueError("not a triaxis raw state (bad magic)")
    (n,) = struct.unpack("<Q", view[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if start + n > len(view):
        raise ValueError("truncated raw state: index past the end")
    index = json.loads(bytes(view[start : start + n]))
    base = _align(start + n)
    tensors = []
    for e in index["tensors"]:
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise ValueError(f"raw state names an unknown dtype {e['dtype']!r}")
        off, nbytes = base + int(e["offset"]), int(e["nbytes"])
        shape = [int(s) for s in e["shape"]]
        if off + nbytes > len(view):
            raise ValueError("truncated raw state: a tensor past the end")
        if nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        flat = torch.frombuffer(view, dtype=torch.uint8, count=nbytes, offset=off)
        tensors.append(flat.view(dtype).reshape(shape))
    return _build(index["tree"], tensors)


def _build(node, tensors: list[torch.Tensor]):
    if isinstance(node, dict):
        if "__t" in node:
            return tensors[int(node["__t"])]
        return {k: _build(v, tensors) for k, v in node["__d"]}
    if isinstance(node, list):
        return [_build(v, tensors) for v in node]
    return node
