"""`triaxis export-hf`: a triaxis checkpoint (saved under any layout) -> a Hugging Face folder
that `LlamaForCausalLM.from_pretrained` loads: config.json + model.safetensors, or numbered
shards plus model.safetensors.index.json when the weights exceed the shard size.

The checkpoint loads into one single-process fp32 model (DCP reshards whatever layout wrote it);
wq/wk rows go back to Hugging Face's RoPE order, one tensor at a time as each shard is written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from triaxis.checkpoint.inference import load_checkpoint_model
from triaxis.errors import UserError
from triaxis.fields import Range, check_value
from triaxis.hf.convert import (
    hf_config_from_args,
    interleaved_rows_to_hf,
    rope_heads,
    triaxis_to_hf_name,
)
from triaxis.hf.importer import CONFIG, INDEX, SINGLE, check_output_folder
from triaxis.model.llama import Transformer


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive names grouped into shards of at most max_shard_bytes (a larger tensor gets a
    shard of its own), in order, as transformers does."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _swap_in(stage: Path, out: Path, names: list[str]) -> None:
    """Move the staged export into `out`: the old model files go first (config.json, the
    commit, before the weights), the new ones come in with config.json last; other files in
    `out` stay."""
    out.mkdir(parents=True, exist_ok=True)
    old = [out / CONFIG, out / INDEX, *sorted(out.glob("model*.safetensors"))]
    for p in old:  # stale shards of an earlier export would mix with the new ones
        p.unlink(missing_ok=True)
    for name in sorted(names, key=lambda n: n == CONFIG):
        os.replace(stage / name, out / name)


@torch.no_grad()
def export_hf(
    checkpoint: str,
    output: str,
    max_shard_gb: float = 5.0,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Write the HF folder; returns the names of the files written."""
    check_value("--max-shard-gb", max_shard_gb, Range(gt=0))
    out = Path(output)
    check_output_folder(out, force, f"{out} (the export folder)", "the model files in it")
    model, ckpt = load_checkpoint_model(checkpoint)  # a bad checkpoint fails here: out untouched
    if model.args.n_experts:
        raise UserError(
            f"{ckpt} holds a mixture of experts (model.n_experts={model.args.n_experts}); "
            "export-hf writes dense Llama models only so far (Mixtral / Qwen3-MoE layouts are "
            "not built): nothing was written"
        )
    # Written into a staging sibling (same file system), swapped in only when complete.
    where = out.resolve()
    stage = where.parent / f".{where.name}.export-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        names = _write(model, stage, max_shard_gb)
        _swap_in(stage, out, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(
        f"exported {ckpt} -> {out}: {len(names) - 1 - (INDEX in names)} safetensors file(s), "
        f"{sum(p.numel() * 4 for p in model.parameters()) / 1e6:.1f} MB fp32"
    )
    return names


def _write(model: Transformer, out: Path, max_shard_gb: float) -> list[str]:
    """config.json + safetensors (+ index) of `model` into the folder `out`; their names."""
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
