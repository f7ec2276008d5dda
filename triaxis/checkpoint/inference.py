"""A checkpoint loaded into one single-process model, for the commands that read trained
weights (`triaxis generate`, `triaxis export-hf`). DCP reshards whatever layout wrote it."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import torch

from triaxis import storage
from triaxis.checkpoint import assets
from triaxis.checkpoint import manifest as mf
from triaxis.checkpoint.dcp_io import checked, load_model_weights
from triaxis.data.dataset import read_manifest
from triaxis.data.format import MANIFEST
from triaxis.data.synthetic import SYNTHETIC
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


def _model_from(
    ckpt: str, meta: dict, device: str, fill_buffers: bool, adapters: bool = False
) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ModelArgs(**meta["model"]))
    section = tomllib.loads(str(meta.get("config") or "")).get("lora") or {}
    if adapters and section.get("enabled"):
        # A LoRA run's model is base + adapters: without them, the load would fill the base
        # alone and generate would sample the untrained model.
        from triaxis.config import LoraConfig
        from triaxis.parallel.lora import apply_lora

        apply_lora(model, LoraConfig(**section))
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


def load_for_inference(
    path: str, device: str = "cpu", data: str = ""
) -> tuple[Transformer, object, str]:
    """(the model in eval mode on device, its tokenizer, the checkpoint folder used).
    `data`: the prepared folder whose tokenizer to use (default: the one the checkpoint
    carries, else, for checkpoints written before they carried one, the recorded folder)."""
    ckpt = find_checkpoint(path)
    meta = checked(ckpt)  # names, sizes; its items are verified as they load
    if not data and assets.carried(meta):
        tok = assets.tokenizer(ckpt, meta)
    else:
        data_path = data or tokenizer_folder(ckpt, meta)
        tok = load_tokenizer(data_path, read_manifest(data_path)["tokenizer"])
    return _model_from(ckpt, meta, device, fill_buffers=True, adapters=True).eval(), tok, ckpt


def tokenizer_folder(ckpt: str, meta: dict) -> str:
    """The prepared folder the checkpoint's run read, found from here. Runs record it absolute
    (or s3://); older runs recorded it as given, relative to the directory they were trained
    in, which the recorded checkpoint folder locates (the checkpoint lies at
    TRAINING_DIR/<checkpoint dir>/step_N)."""
    recorded = str(meta.get("data_path") or "")
    fix = "pass --data PATH (the prepared folder with the run's tokenizer)"
    old = "; it was written before checkpoints carried their tokenizer"
    if not recorded or recorded == SYNTHETIC:
        what = "synthetic data, which has no tokenizer" if recorded else "no data folder"
        raise UserError(f"{ckpt} records {what}; {fix}")
    if storage.is_remote(recorded) or os.path.isabs(recorded):
        if not storage.is_remote(recorded) and not os.path.isdir(recorded):
            raise UserError(f"{ckpt} records its data folder {recorded}, which is gone{old}; {fix}")
        return recorded
    where = [Path(recorded)]
    trained_in = _training_dir(ckpt, meta)
    if trained_in is not None:
        where.insert(0, trained_in / recorded)
    for folder in where:
        if (folder / MANIFEST).is_file():
            return str(folder)
    raise UserError(
        f"{ckpt} records its data folder as {recorded!r}, relative to the directory it was "
        f"trained in, and it is not under {os.getcwd()}"
        + (f" nor {trained_in}" if trained_in is not None else "")
        + f"{old}; run from the training directory or {fix}"
    )


def _training_dir(ckpt: str, meta: dict) -> Path | None:
    """The directory a run was started in, from where its checkpoint lies and the checkpoint
    folder its config names, relative to that directory (None: not knowable)."""
    if storage.is_remote(ckpt):
        return None
    try:
        cfg = tomllib.loads(str(meta.get("config") or ""))
        named = cfg.get("checkpoint", {}).get("dir") or os.path.join(
            cfg["train"]["run_dir"], "checkpoints"
        )
    except (tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError):
        return None
    parts = Path(os.path.normpath(str(named))).parts
    folder = Path(ckpt).resolve().parent  # the checkpoints folder
    if os.path.isabs(named) or ".." in parts or folder.parts[-len(parts) :] != parts:
        return None
    return Path(*folder.parts[: -len(parts)])
