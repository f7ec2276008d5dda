"""`triaxis export-hf`: a triaxis checkpoint (saved under any layout) -> a Hugging Face folder
that `LlamaForCausalLM.from_pretrained` loads (`MixtralForCausalLM` for an MoE, hf/moe.py):
config.json + model.safetensors, or numbered
shards plus model.safetensors.index.json when the weights exceed the shard size, and the
tokenizer files and generation_config.json the checkpoint carries (`AutoTokenizer` loads them).

The weights stream one tensor at a time (DCP reads each from whatever layout wrote it), in fp32
or bf16; wq/wk rows go back to Hugging Face's RoPE order as each tensor is written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from triaxis.checkpoint import assets
from triaxis.checkpoint import manifest as mf
from triaxis.checkpoint.dcp_io import checked
from triaxis.checkpoint.inference import find_checkpoint, tokenizer_folder
from triaxis.data.dataset import read_manifest
from triaxis.errors import UserError
from triaxis.fields import Range, check_value
from triaxis.hf import moe
from triaxis.hf.convert import (
    hf_config_from_args,
    interleaved_rows_to_hf,
    rope_heads,
    triaxis_to_hf_name,
)
from triaxis.hf.importer import CONFIG, INDEX, SINGLE, check_output_folder
from triaxis.hf.stream import DTYPES, load_param, model_params, nbytes, write_safetensors


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
    dtype: str = "fp32",
) -> list[str]:
    """Write the HF folder; returns the names of the files written. The weights stream one
    tensor at a time from the checkpoint into the safetensors files (stream.py)."""
    check_value("--max-shard-gb", max_shard_gb, Range(gt=0))
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}; pick one of them")
    out = Path(output)
    check_output_folder(out, force, f"{out} (the export folder)", "the model files in it")
    ckpt = find_checkpoint(checkpoint)
    meta = checked(ckpt)  # names and sizes; each tensor is verified as it loads
    # Written into a staging sibling (same file system), swapped in only when complete: a
    # tensor that fails its checksum midway leaves `out` untouched.
    where = out.resolve()
    stage = where.parent / f".{where.name}.export-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    extra = tokenizer_files(ckpt, log)
    try:
        for name, data in extra.items():
            (stage / name).write_bytes(data)
        names, total = _write(ckpt, meta, stage, max_shard_gb, _token_ids(extra), DTYPES[dtype])
        names += sorted(extra)
        _swap_in(stage, out, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    weights = [n for n in names if n.endswith(".safetensors")]
    log(
        f"exported {ckpt} -> {out}: {len(weights)} safetensors file(s), "
        f"{total / 1e6:.1f} MB {dtype}"
    )
    return names


def tokenizer_files(ckpt: str, log: Callable[[str], None]) -> dict[str, bytes]:
    """The tokenizer files the checkpoint carries; for an older checkpoint, those of the data
    folder it records (a hint, and none, when that is gone)."""
    meta = mf.load_manifest(ckpt)
    if assets.carried(meta):
        return assets.hf_files(ckpt, meta)
    try:
        folder = tokenizer_folder(ckpt, meta)
        info = read_manifest(folder)["tokenizer"]
        return assets.gather(folder, info, meta["model"].get("max_seq_len", 0))
    except UserError as err:
        log(f"note: no tokenizer files exported ({err}); copy them into the folder by hand")
        return {}


def _token_ids(files: dict[str, bytes]) -> dict:
    """bos/eos ids for config.json, from the generation config."""
    try:
        gen = json.loads(files.get(assets.GENERATION, b"{}"))
    except ValueError:
        return {}
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: gen[k] for k in keys if isinstance(gen, dict) and k in gen}


def _write(
    ckpt: str, meta: dict, out: Path, max_shard_gb: float, ids: dict, dtype: torch.dtype
) -> tuple[list[str], int]:
    """config.json + safetensors (+ index) of the checkpoint's model into the folder `out`,
    one tensor in memory at a time; (their names, the weights' bytes)."""
    args, params = model_params(meta)
    hf_config = hf_config_from_args(args)  # refuses an MoE shape Mixtral cannot express
    # HF name -> (triaxis name, HF shape, expert index or None), in the model's order.
    by_hf = {}
    for n, shape in params:
        for hf, j in moe.hf_names_of(n, args) or [(triaxis_to_hf_name(n), None)]:
            by_hf[hf] = (n, shape if j is None else torch.Size(shape[1:][::-1]), j)
    sizes = [(hf, nbytes(shape, dtype)) for hf, (_, shape, _) in by_hf.items()]
    shards = plan_shards(sizes, int(max_shard_gb * 1e9))  # GB as transformers counts them
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    stacked: dict[str, torch.Tensor] = {}  # the one stacked expert tensor being written

    def tensor(hf: str) -> torch.Tensor:
        name, shape, expert = by_hf[hf]
        if expert is not None:
            if name not in stacked:
                stacked.clear()
                stacked[name] = load_param(ckpt, meta, name, dict(params)[name])
            return moe.expert_to_hf(stacked[name], expert)
        p = load_param(ckpt, meta, name, shape)
        heads = rope_heads(name, args)
        return interleaved_rows_to_hf(p, heads) if heads else p

    for file, shard in zip(names, shards):
        write_safetensors(str(out / file), [(hf, by_hf[hf][1]) for hf in shard], dtype, tensor)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s for _, s in sizes)},
            "weight_map": {hf: f for f, shard in zip(names, shards) for hf in shard},
        }
        (out / INDEX).write_text(json.dumps(index, indent=2))
    config = {**hf_config, **ids, "torch_dtype": str(dtype).split(".")[1]}
    # Last: without config.json the folder is not a loadable model (an interrupted export).
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return [CONFIG, *names] + ([INDEX] if len(shards) > 1 else []), sum(s for _, s in sizes)
