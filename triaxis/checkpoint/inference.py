"""A checkpoint loaded into one single-process model, for the commands that read trained
weights (`triaxis generate`, `triaxis export-hf`). DCP reshards whatever layout wrote it."""

from __future__ import annotations

import torch

from triaxis import storage
from triaxis.checkpoint import manifest as mf
from triaxis.checkpoint.dcp_io import checked, load_model_weights
from triaxis.data.dataset import read_manifest
from triaxis.data.tokenizer import load_tokenizer
from triaxis.errors import UserError
from triaxis.model import ModelArgs, Transformer


def find_checkpoint(path: str) -> str:
    """A run folder (its latest checkpoint), a checkpoints folder, or one checkpoint."""
    if storage.exists(storage.join(path, mf.META)):
        return str(path)
    for folder in (storage.join(path, "checkpoints"), str(path)):
        found = [f.path for f in mf.list_checkpoints(folder)]
        if found:
            return found[-1]
    raise UserError(
        f"no complete checkpoint under {path}; pass a run folder that has trained "
        "with checkpoints on, or a step_XXXXXXXX folder"
    )


def _model_from(ckpt: str, meta: dict, device: str, fill_buffers: bool) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ModelArgs(**meta["model"]))
    model.materialize(device)
    if fill_buffers:
        model.init_weights(0)  # fills the RoPE buffer; the weights come from the checkpoint
    load_model_weights(model, ckpt, meta)
    return model


def load_checkpoint_model(checkpoint: str) -> tuple[Transformer, str]:
    """(single-process fp32 model with the checkpoint's weights, the checkpoint folder used).
    Parameters only: buffers stay unfilled (what an export writes)."""
    ckpt = str(find_checkpoint(checkpoint))
    meta = checked(ckpt)  # names and sizes; each item is verified as it loads
    return _model_from(ckpt, meta, "cpu", fill_buffers=False), ckpt


def load_for_inference(path: str, device: str = "cpu") -> tuple[Transformer, object, str]:
    """(the model in eval mode on device, the data's tokenizer, the checkpoint folder used)."""
    ckpt = find_checkpoint(path)
    meta = checked(ckpt)  # names, sizes; its items are verified as they load
    data_path = meta.get("data_path") or ""
    if not data_path:
        raise UserError(f"{ckpt} does not record its data folder: cannot find its tokenizer")
    tok = load_tokenizer(data_path, read_manifest(data_path)["tokenizer"])
    return _model_from(ckpt, meta, device, fill_buffers=True).eval(), tok, ckpt
