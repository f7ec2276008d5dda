"""Loading what a checkpoint folder holds without running code from it.

DCP stores two pickles: `.metadata` (read with plain `pickle.load`) and each non-tensor value
(an int, a list of param groups) as a `torch.save` blob that DCP's default planner reads with
`weights_only=False`. Both would run whatever a crafted file asks for. Here `.metadata` goes
through an unpickler that admits only DCP's own metadata classes and the few torch types they
hold, and non-tensor values load with `weights_only=True`. The sha256/crc in `triaxis.json`
cannot help: whoever wrote the folder also wrote the manifest.
"""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from triaxis.errors import UserError

_DCP_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_MD, "Metadata"),
    (_DCP_MD, "MetadataIndex"),
    (_DCP_MD, "StorageMeta"),
    (_DCP_MD, "TensorStorageMetadata"),
    (_DCP_MD, "BytesStorageMetadata"),
    (_DCP_MD, "ChunkStorageMetadata"),
    (_DCP_MD, "TensorProperties"),
    (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    # StorageMeta.checkpoint_id is the folder the writer was given
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or _is_dtype(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


class UnsafeMetadata(Exception):
    """A `.metadata` file that names something DCP's metadata never holds."""


def load_metadata(raw: bytes, where: str):
    """DCP's Metadata from the bytes of a `.metadata` file; refuses anything else."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as err:
        raise UnsafeMetadata(
            f"{where} is not DCP metadata: it asks to load {err}, which a checkpoint never "
            "holds; refusing to open it (nothing was run)"
        ) from None
    except Exception as err:  # truncated or garbled: not metadata either
        raise UnsafeMetadata(
            f"{where} is not readable DCP metadata ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(md, Metadata):
        raise UnsafeMetadata(f"{where} holds a {type(md).__name__}, not DCP metadata")
    return md


def unsafe_in(err: BaseException) -> UnsafeMetadata | None:
    """The UnsafeMetadata inside `err` (DCP wraps each rank's failure), if any."""
    from triaxis.checkpoint.integrity import find_in

    return find_in(err, UnsafeMetadata)


def refuse(err: UnsafeMetadata, path: str) -> UserError:
    return UserError(
        f"checkpoint {path}: {err}. Use a checkpoint from a source you trust, or "
        "re-create it (e.g. `triaxis import-hf`)"
    )


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values load with weights_only=True (plain data
    and tensors only: what triaxis saves)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeMetadata(
                f"the value {read_item.dest_index.fqn!r} is not plain data ({str(err)[:200]}); "
                "refusing to load it (nothing was run)"
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
