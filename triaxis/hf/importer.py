"""`triaxis import-hf`: a Hugging Face Llama folder -> a triaxis checkpoint that loads under any
layout.

The folder holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Tensors stream one at a time from the safetensors files into a
single-process fp32 Transformer (the source copy of a tensor is freed before the next is read),
after the complete set of names has been checked against the model: missing or extra tensors
fail before anything is read, like a strict `load_state_dict`. The model is then saved with DCP
under the single-device names, which is what every layout loads (DCP reshards on load), and
`triaxis.json` is written last: it is the commit marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from triaxis.errors import UserError
from triaxis.fields import Range, check_value
from triaxis.hf import moe
from triaxis.hf.convert import (
    HF_LM_HEAD,
    args_from_hf_config,
    hf_rows_to_interleaved,
    hf_to_triaxis_name,
    rope_heads,
)
from triaxis.model.llama import ModelArgs, Transformer, model_rope_tables

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
META = "triaxis.json"  # the checkpoint's commit marker (triaxis.checkpoint)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


_INT_KEYS = {
    "hidden_size": True,
    "num_hidden_layers": True,
    "num_attention_heads": True,
    "intermediate_size": True,
    "vocab_size": True,
    "num_key_value_heads": False,
    "max_position_embeddings": False,
    "head_dim": False,
}
"""Integer fields of config.json (True: required; a missing one is convert.py's to name)."""
_FLOAT_KEYS = {"rms_norm_eps": Range(gt=0, lt=1), "rope_theta": Range(gt=0)}


def check_config_values(config: object, where: str) -> None:
    """Types and ranges of the shape fields, before any of them sizes a tensor."""
    if not isinstance(config, dict):
        raise UserError(
            f"{where} holds a JSON {type(config).__name__}, not an object; not a "
            "Hugging Face config"
        )
    for key in _INT_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {key}={value!r} must be a whole number")
        check_value(f"{where}: {key}", value, Range(ge=1, lt=2**31))
    for key, rule in _FLOAT_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {key}={value!r} must be a number")
        check_value(f"{where}: {key}", float(value), rule)


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[Path, list[str]]]:
    """(config.json, {safetensors file: the tensor names it holds})."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(
            f"{root} is not a folder; pass a Hugging Face model folder "
            f"({CONFIG} + {SINGLE} or {INDEX})"
        )
    if not (root / CONFIG).is_file():
        raise UserError(
            f"{root} has no {CONFIG}: not a Hugging Face model folder (expected "
            f"{CONFIG} and {SINGLE} or {INDEX})"
        )
    config = _read_json(root / CONFIG)
    check_config_values(config, str(root / CONFIG))
    if (root / INDEX).is_file():
        index = _read_json(root / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{root / INDEX} has no weight_map")
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
                raise UserError(
                    f"{root / INDEX}: {name} is in {file!r}, not a file name in "
                    f"{root}; the index is damaged"
                )
            files.setdefault(root / file, []).append(name)
        missing = sorted(f.name for f in files if not f.is_file())
        if missing:
            raise UserError(
                f"{root / INDEX} lists {', '.join(missing)}, missing from {root}; "
                "download every shard of the model"
            )
        return config, files
    if (root / SINGLE).is_file():
        with _open_safetensors(root / SINGLE) as f:
            return config, {root / SINGLE: list(f.keys())}
    if any(root.glob("pytorch_model*.bin")):
        raise UserError(
            f"{root} holds pytorch_model*.bin but no safetensors; import-hf reads "
            "safetensors only: re-save with save_pretrained(safe_serialization=True)"
        )
    raise UserError(f"{root} has neither {SINGLE} nor {INDEX}")


def _plan(
    files: dict[Path, list[str]], args: ModelArgs, expected: set[str]
) -> dict[Path, list[tuple[str, str]]]:
    """Per file, the (HF name, triaxis name) pairs to copy; strict about the set of names. An
    expert's slice of a stacked parameter is named `NAME#EXPERT`."""
    plan: dict[Path, list[tuple[str, str]]] = {}
    seen: set[str] = set()
    for file, names in files.items():
        for hf_name in names:
            name = hf_to_triaxis_name(hf_name)
            if name is None or (hf_name == HF_LM_HEAD and args.tie_embeddings):
                continue  # a recomputed buffer, or the tied head (the embedding already)
            target = moe.hf_moe_target(hf_name)
            if target is not None and target[1] is not None:
                name = f"{name}#{target[1]}"
            plan.setdefault(file, []).append((hf_name, name))
            seen.add(name)
    missing, extra = sorted(expected - seen), sorted(seen - expected)
    if missing:
        raise UserError(
            f"the checkpoint lacks {len(missing)} tensors that config.json implies, "
            f"e.g. {', '.join(missing[:3])}; are config.json and the weights from the "
            "same model?"
        )
    if extra:
        raise UserError(
            f"the checkpoint has {len(extra)} tensors that config.json does not "
            f"account for, e.g. {', '.join(extra[:3])} (num_hidden_layers="
            f"{args.n_layers}); are config.json and the weights from the same model?"
        )
    return plan


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError (not importable by name in every version)
        raise UserError(
            f"{path} is not a readable safetensors file ({e}); download it again"
        ) from None


@torch.no_grad()
def load_hf_model(folder: str | Path) -> Transformer:
    """A single-process fp32 Transformer holding the weights of an HF Llama folder."""
    config, files = read_hf_folder(folder)
    has_head = any(HF_LM_HEAD in names for names in files.values())
    args = args_from_hf_config(config, has_head, where=str(Path(folder) / CONFIG))
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize("cpu")
    # The RoPE buffer is not part of a checkpoint; fill it so the model can run as returned.
    model.rope.copy_(model_rope_tables(args))
    targets = model.state_dict()  # tensors sharing the parameters' storage
    expected = set()
    for k, t in targets.items():
        if k.endswith(moe.ROUTER_BUFFERS):
            t.zero_()  # triaxis's balancing state: not in an HF checkpoint, starts at zero
        elif k.endswith(moe.STACKED):
            expected.update(f"{k}#{j}" for j in range(t.shape[0]))
        elif not (k == "output.weight" and args.tie_embeddings):
            expected.add(k)
    for file, pairs in _plan(files, args, expected).items():
        with _open_safetensors(file) as f:
            for hf_name, name in pairs:
                try:
                    t = f.get_tensor(hf_name)
                except Exception as e:  # SafetensorError: a damaged or truncated file
                    raise UserError(
                        f"{file}: cannot read {hf_name} ({e}); download the file again"
                    ) from None
                name, _, expert = name.partition("#")
                target = targets[name][int(expert)].t() if expert else targets[name]
                if t.shape != target.shape:
                    raise UserError(
                        f"{file.name}: {hf_name} has shape {tuple(t.shape)} but "
                        f"config.json implies {tuple(target.shape)}"
                    )
                if expert:
                    target.copy_(t)  # a transposed view of the expert's slice
                    continue
                heads = rope_heads(name, args)
                targets[name].copy_(hf_rows_to_interleaved(t, heads) if heads else t)
    if args.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight, "tied weights came apart"
        _check_tied_head(files, model.tok_embeddings.weight)
    return model.eval()


def _check_tied_head(files: dict[Path, list[str]], embedding: torch.Tensor) -> None:
    """A tied config with a stored lm_head that is not the embedding is two models: transformers
    4 ties (the head := the embedding), transformers 5 loads the stored head. Refuse it."""
    for file, names in files.items():
        if HF_LM_HEAD not in names:
            continue
        with _open_safetensors(file) as f:
            head = f.get_tensor(HF_LM_HEAD)
        if head.shape != embedding.shape or not torch.equal(head.to(embedding.dtype), embedding):
            raise UserError(
                f"{file.name}: config.json says tie_word_embeddings=true but lm_head.weight "
                "differs from model.embed_tokens.weight, and transformers versions disagree "
                "on which head that means; set it to false to import the stored head, or "
                "delete lm_head.weight to tie the head to the embedding"
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(model: Transformer, output: str | Path, source: str) -> None:
    """A committed single-process checkpoint of `model` (weights only, step 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    import triaxis.checkpoint.dcp  # noqa: F401  (quiets DCP's single-process warning)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out))
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(out.iterdir())
        if p.name == ".metadata" or p.name.startswith("__0_")
    }
    meta = {
        "step": 0,
        "cursor": 0,
        "model": dataclasses.asdict(model.args),
        "layout": {"world_size": 1, "pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1},
        "world_size": 1,
        "data_path": "",
        "source": source,
        "files": files,
    }
    (out / META).write_text(json.dumps(meta, indent=1))  # last: the commit marker


def check_output_folder(out: Path, force: bool, named: str, overwrites: str) -> None:
    """Refuse an output that must not be written (a file; a folder with files in it, unless
    --force), before anything is read or written. Import and export both."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{named} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"{named} is not empty; choose another folder or pass --force to overwrite {overwrites}"
        )


def import_hf(
    folder: str, output: str, force: bool = False, log: Callable[[str], None] = print
) -> ModelArgs:
    out = Path(output)
    check_output_folder(out, force, f"--output {out}", "its checkpoint")
    model = load_hf_model(folder)  # bad input fails here: the existing checkpoint untouched
    # Saved into a staging sibling, swapped in only when complete.
    where = out.resolve()
    stage = where.parent / f".{where.name}.import-{uuid.uuid4().hex[:8]}"
    try:
        save_checkpoint(model, stage, source=f"hf:{Path(folder).resolve()}")
        _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    count = sum(p.numel() for p in model.parameters())
    log(
        f"imported {folder} -> {out}: {count / 1e6:.2f}M parameters "
        f"({'tied' if model.args.tie_embeddings else 'untied'} embeddings)"
    )
    return model.args


def _is_checkpoint_file(name: str) -> bool:
    return name in (META, ".metadata") or (name.startswith("__") and name.endswith(".distcp"))


def _swap_in(stage: Path, out: Path) -> None:
    """Replace the checkpoint in `out` by the staged one: the old commit marker goes first,
    then the old checkpoint files, the new files come in with the marker last; other files in
    `out` stay."""
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_file() and _is_checkpoint_file(p.name):
            p.unlink()
    for p in sorted(stage.iterdir(), key=lambda p: p.name == META):
        os.replace(p, out / p.name)
