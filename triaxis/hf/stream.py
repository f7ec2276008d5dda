"""Safetensors written one tensor at a time, from a checkpoint read one tensor at a time: what
`export-hf` holds in memory is one tensor (in its checkpoint dtype and its output dtype), never
the whole model, whatever the model's size.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and [begin, end) byte offsets, padded with spaces to a multiple of 8 bytes), then the
tensors' bytes in header order. Shapes and dtypes are known before any tensor is read, so the
header goes first and each tensor follows as it is loaded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable

import torch

from triaxis.checkpoint import checksum, dcp_io
from triaxis.model import ModelArgs, Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SAFETENSORS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def model_params(meta: dict) -> tuple[ModelArgs, list[tuple[str, torch.Size]]]:
    """(the model shape, (name, shape) of every parameter in order) of a checkpoint's model,
    from a meta-device build: nothing is allocated. A tied head is listed once, as the
    embedding (Hugging Face ties it back from config.json)."""
    args = ModelArgs(**meta["model"])
    with torch.device("meta"):
        model = Transformer(args)
    return args, [(n, p.shape) for n, p in model.named_parameters()]


def load_param(ckpt: str, meta: dict, name: str, shape: torch.Size) -> torch.Tensor:
    """One fp32 parameter of a checkpoint saved under any layout (DCP reads just its pieces),
    checked against its write-time checksums."""
    t = torch.empty(shape, dtype=torch.float32)
    dcp_io.load(
        {"model": {name: t}},
        ckpt,
        dcp_io.expected_files(meta),
        algorithm=checksum.of_manifest(meta),
        no_dist=True,  # under a run, every rank reads its own tensors (checkpoint.hf)
    )
    return t


def nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return shape.numel() * dtype.itemsize


def write_safetensors(
    path: str,
    entries: Iterable[tuple[str, torch.Size]],
    dtype: torch.dtype,
    tensor: Callable[[str], torch.Tensor],
    write_open: Callable = open,
) -> None:
    """Write `entries` (name, shape) as `dtype` into one safetensors file; `tensor(name)` gives
    each in turn, loaded only when its bytes are due."""
    entries = list(entries)
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in entries:
        size = nbytes(shape, dtype)
        header[name] = {
            "dtype": _SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + size],
        }
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with write_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in entries:
            t = tensor(name).to(dtype).contiguous()
            assert t.shape == shape, f"{name}: {tuple(t.shape)} vs header {tuple(shape)}"
            # bf16 has no numpy dtype: its bytes go out through a same-size integer view.
            view = t.view(torch.int16) if dtype == torch.bfloat16 else t
            f.write(memoryview(view.numpy()).cast("B"))  # no copy of the bytes
            del t, view
