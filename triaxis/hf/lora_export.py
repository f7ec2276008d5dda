"""`triaxis export-hf --lora | --merge`: a LoRA run's checkpoint as PEFT's adapter folder
(`adapter_model.safetensors` + `adapter_config.json`, which `peft.PeftModel.from_pretrained`
puts onto the base model) or as one merged Hugging Face model (W + alpha/rank * B A).

The base the adapter goes onto is the run's frozen base: the original Hugging Face model, or
`triaxis export-hf` of the same checkpoint without a flag (it writes the base weights only).
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from triaxis.checkpoint.dcp_io import checked, load_model_weights
from triaxis.checkpoint.inference import find_checkpoint
from triaxis.config import LoraConfig
from triaxis.errors import UserError
from triaxis.hf.convert import (
    hf_config_from_args,
    interleaved_rows_to_hf,
    rope_heads,
    triaxis_to_hf_name,
)
from triaxis.hf.exporter import _swap_in, plan_shards, tokenizer_files
from triaxis.hf.importer import CONFIG, INDEX, SINGLE, check_output_folder
from triaxis.model import ModelArgs, Transformer
from triaxis.parallel.lora import apply_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_lora_model(checkpoint: str, no_dist: bool = False) -> tuple[Transformer, LoraConfig, str]:
    """(one-process fp32 model with the adapters, the run's [lora], the checkpoint used)."""
    ckpt = str(find_checkpoint(checkpoint))
    meta = checked(ckpt)
    section = tomllib.loads(str(meta.get("config") or "")).get("lora") or {}
    cfg = LoraConfig(**section)
    if not cfg.enabled:
        raise UserError(
            f"{ckpt} is not from a LoRA run (lora.enabled=false); export it without "
            "--lora / --merge"
        )
    with torch.device("meta"):
        model = Transformer(ModelArgs(**meta["model"]))
    apply_lora(model, cfg)
    model.materialize("cpu")
    load_model_weights(model, ckpt, meta, no_dist=no_dist)  # no_dist: one rank of a run
    return model, cfg, ckpt


def adapted_linears(model: Transformer) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_a")}


def peft_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """PEFT's keys (`base_model.model.<HF module>.lora_A.weight`); B's rows of wq/wk in HF's
    RoPE order, as the base rows are (delta W = B A permutes with W's rows)."""
    out = {}
    for name, lin in adapted_linears(model).items():
        hf = "base_model.model." + triaxis_to_hf_name(name + ".weight").removesuffix(".weight")
        heads = rope_heads(name + ".weight", model.args)
        b = lin.lora_b.weight
        out[hf + ".lora_A.weight"] = lin.lora_a.weight.contiguous()
        out[hf + ".lora_B.weight"] = (interleaved_rows_to_hf(b, heads) if heads else b).contiguous()
    return out


def peft_config(model: Transformer, cfg: LoraConfig) -> dict:
    modules = [
        triaxis_to_hf_name(n + ".weight").removesuffix(".weight") for n in adapted_linears(model)
    ]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


@torch.no_grad()
def merged_model(model: Transformer, cfg: LoraConfig) -> Transformer:
    """A plain Transformer whose adapted weights are W + alpha/rank * B A."""
    with torch.device("meta"):
        plain = Transformer(model.args)
    plain.materialize("cpu")
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, lin in adapted_linears(model).items():
        delta = lin.lora_b.weight @ lin.lora_a.weight
        sd[name + ".weight"] = sd[name + ".weight"] + delta * (cfg.alpha / cfg.rank)
    plain.load_state_dict(sd, strict=True)
    return plain


def _write_model(model: Transformer, out: Path, max_shard_gb: float) -> list[str]:
    """config.json + safetensors (+ index) of a model held in memory (the merged one: it is
    built whole here anyway) into the folder `out`; their names. export_hf streams instead."""
    from safetensors.torch import save_file

    args = model.args
    # named_parameters lists a tied head once, as the embedding: HF ties it back from config.
    params = {triaxis_to_hf_name(n): (n, p) for n, p in model.named_parameters()}
    sizes = [(hf, p.numel() * p.element_size()) for hf, (_, p) in params.items()]
    shards = plan_shards(sizes, int(max_shard_gb * 1e9))  # GB as transformers counts them
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(names, shards):
        tensors = {}
        for hf in shard:
            name, p = params[hf]
            heads = rope_heads(name, args)
            tensors[hf] = (interleaved_rows_to_hf(p, heads) if heads else p).contiguous()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s for _, s in sizes)},
            "weight_map": {hf: f for f, shard in zip(names, shards) for hf in shard},
        }
        (out / INDEX).write_text(json.dumps(index, indent=2))
    # Last: without config.json the folder is not a loadable model (an interrupted export).
    (out / CONFIG).write_text(json.dumps(hf_config_from_args(args), indent=2))
    return [CONFIG, *names] + ([INDEX] if len(shards) > 1 else [])


@torch.no_grad()
def export_lora(
    checkpoint: str,
    output: str,
    merge: bool,
    max_shard_gb: float = 5.0,
    force: bool = False,
    log: Callable[[str], None] = print,
    no_dist: bool = False,
) -> list[str]:
    """Write the adapter folder (merge=False) or the merged model; the names written.
    `no_dist`: called on one rank of a run (checkpoint.hf), reading without a collective."""
    out = Path(output)
    check_output_folder(out, force, f"{out} (the export folder)", "the model files in it")
    model, cfg, ckpt = load_lora_model(
        checkpoint, no_dist
    )  # a bad checkpoint fails here: out untouched
    where = out.resolve()
    stage = where.parent / f".{where.name}.export-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        if merge:
            names = _write_model(merged_model(model, cfg), stage, max_shard_gb)
            # The tokenizer the checkpoint carries, as the plain export writes it.
            extra = tokenizer_files(ckpt, log)
            for name, data in extra.items():
                (stage / name).write_bytes(data)
            names += sorted(extra)
        else:
            from safetensors.torch import save_file

            save_file(peft_tensors(model), str(stage / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (stage / ADAPTER_CONFIG).write_text(json.dumps(peft_config(model, cfg), indent=2))
            names = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
            out.mkdir(parents=True, exist_ok=True)
            # Only the adapter's own files are replaced: a base model beside them stays.
            for name in names:
                os.replace(stage / name, out / name)
        if merge:
            _swap_in(stage, out, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    what = "merged model" if merge else f"PEFT adapter ({len(adapted_linears(model))} Linears)"
    log(f"exported {ckpt} -> {out}: {what}")
    return names
