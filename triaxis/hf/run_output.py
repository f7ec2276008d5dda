"""`checkpoint.hf`: the run writes a Hugging Face folder into a committed checkpoint's `hf/`.

Every rank writes its own share of the safetensors shards (shard i goes to rank i mod world),
streaming one tensor at a time from the checkpoint just committed (stream.py): no rank holds
more than one tensor in its checkpoint dtype and in its output dtype, whatever the model's
size. Rank 0 adds config.json, the index, the tokenizer files and generation_config.json. All
of it goes into a hidden staging folder beside `hf/`, renamed into place only when every rank
succeeded; a failure is a warning, and the committed checkpoint is never touched.

A LoRA run's `hf/` is the PEFT adapter folder (adapter_model.safetensors + adapter_config.json,
written by rank 0: the adapters are small) plus the tokenizer files; `export-hf --merge` writes
the merged model offline.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import tomllib
from pathlib import Path

from triaxis import storage
from triaxis.checkpoint.dcp_io import checked
from triaxis.hf.exporter import _token_ids, plan_shards, tokenizer_files
from triaxis.hf.importer import CONFIG, INDEX
from triaxis.hf.stream import DTYPES, load_param, model_params, nbytes, write_safetensors
from triaxis.parallel.host import host_all_gather_object

HF_DIR = "hf"
MAX_SHARD_BYTES = 5_000_000_000  # transformers' default shard size


def shard_plan(meta: dict, dtype, world: int) -> tuple[list[str], list[list[str]], dict]:
    """(file names, HF tensor names per file, HF name -> (triaxis name, shape)): at least one
    shard per rank where the model has enough tensors, so every rank writes a share."""
    from triaxis.hf.convert import triaxis_to_hf_name

    _, params = model_params(meta)
    by_hf = {triaxis_to_hf_name(n): (n, shape) for n, shape in params}
    sizes = [(hf, nbytes(shape, dtype)) for hf, (_, shape) in by_hf.items()]
    total = sum(s for _, s in sizes)
    shards = plan_shards(sizes, min(MAX_SHARD_BYTES, max(1, math.ceil(total / world))))
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return names, shards, by_hf


def _is_lora(meta: dict) -> bool:
    section = tomllib.loads(str(meta.get("config") or "")).get("lora") or {}
    return bool(section.get("enabled"))


def write_rank_share(folder: str, stage: Path, dtype_name: str, rank: int, world: int) -> int:
    """This rank's shards (and, on rank 0, the small files) of the checkpoint `folder` into
    `stage`; returns the weight bytes written here."""
    from triaxis.hf.convert import hf_config_from_args, interleaved_rows_to_hf, rope_heads

    meta = checked(folder)
    dtype = DTYPES[dtype_name]
    args, _ = model_params(meta)
    names, shards, by_hf = shard_plan(meta, dtype, world)

    def tensor(hf: str):
        name, shape = by_hf[hf]
        p = load_param(folder, meta, name, shape)
        heads = rope_heads(name, args)
        return interleaved_rows_to_hf(p, heads) if heads else p

    written = 0
    for i in range(rank, len(names), world):
        entries = [(hf, by_hf[hf][1]) for hf in shards[i]]
        write_safetensors(str(stage / names[i]), entries, dtype, tensor)
        written += sum(nbytes(s, dtype) for _, s in entries)
    if rank == 0:
        extra = tokenizer_files(folder, lambda _m: None)
        for name, data in extra.items():
            (stage / name).write_bytes(data)
        total = sum(nbytes(s, dtype) for _, s in by_hf.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {hf: f for f, shard in zip(names, shards) for hf in shard},
        }
        (stage / INDEX).write_text(json.dumps(index, indent=2))
        config = {**hf_config_from_args(args), **_token_ids(extra), "torch_dtype": str(dtype)[6:]}
        (stage / CONFIG).write_text(json.dumps(config, indent=2))
    return written


def _write_adapter(folder: str, stage: Path) -> None:
    from triaxis.hf.lora_export import export_lora

    export_lora(folder, str(stage), merge=False, force=True, log=lambda _m: None, no_dist=True)
    for name, data in tokenizer_files(folder, lambda _m: None).items():
        (stage / name).write_bytes(data)


def _commit(partial: str, out: str, remote: bool) -> None:
    """The staged folder into place. Local: one rename. S3 has none: each object is copied
    server-side into `out` with config.json last, so a folder that has a config.json is whole
    (transformers reads nothing without it), then the staged objects go."""
    storage.remove(out)
    if not remote:
        os.replace(partial, out)
        return
    names = storage.listdir(partial)
    for name in sorted(names, key=lambda n: n == CONFIG):
        storage.copy(storage.join(partial, name), storage.join(out, name))
    storage.remove(partial)


class HfOutput:
    """The Checkpointer's commit hook: `(folder, step, group)` on every rank, in step."""

    def __init__(self, cfg, rank: int, world: int, log):
        self.when, self.dtype = cfg.checkpoint.hf, cfg.checkpoint.hf_dtype
        self.steps, self.rank, self.world, self.log = cfg.train.steps, rank, world, log
        self.last_bytes = 0  # this rank's weight bytes of the last write (for the benchmark)

    def wanted(self, step: int) -> bool:
        return self.when == "every" or (self.when == "final" and step == self.steps)

    def __call__(self, folder: str, step: int, group) -> str | None:
        """Write `folder`/hf; its path, or None after a warning (the checkpoint stays)."""
        if not self.wanted(step):
            return None
        remote = storage.is_remote(folder)
        out = storage.join(folder, HF_DIR)
        partial = storage.join(folder, f".{HF_DIR}.partial")
        err, stage = None, None
        try:
            if remote:  # each rank stages its share on its own disk, then uploads it
                stage = Path(tempfile.mkdtemp(prefix="triaxis-hf-"))
                if self.rank == 0:
                    storage.remove(partial)  # an interrupted earlier attempt
            else:
                stage = Path(partial)
                if self.rank == 0:
                    shutil.rmtree(stage, ignore_errors=True)  # an interrupted earlier attempt
                    stage.mkdir(parents=True)
        except OSError as e:
            err = e
        ok = self._agree(err, group)
        try:
            if ok:
                meta = checked(folder)
                if _is_lora(meta):
                    if self.rank == 0:
                        _write_adapter(folder, stage)
                else:
                    self.last_bytes = write_rank_share(
                        folder, stage, self.dtype, self.rank, self.world
                    )
            if ok and remote:
                for f in sorted(stage.iterdir()):
                    storage.upload(str(f), storage.join(partial, f.name))
        except Exception as e:  # noqa: BLE001  (agreed on below; a warning, not a stop)
            err = e
        finally:
            if remote and stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        ok = ok and self._agree(err, group)
        err = None
        if self.rank == 0:
            try:
                if ok:
                    _commit(partial, out, remote)
                else:
                    storage.remove(partial)
            except Exception as e:  # noqa: BLE001  (a warning, not a stop)
                err = e
        # Nobody reads `out` before it is in place.
        ok = self._agree(err, group) and ok
        if ok and self.rank == 0:
            self.log.info(f"Hugging Face folder {out} ({self.dtype})")
        return out if ok else None

    def _agree(self, err: BaseException | None, group) -> bool:
        mine = None if err is None else f"rank {self.rank}: {type(err).__name__}: {err}"
        got = [mine] if group is None else host_all_gather_object(mine, group, self.world)
        failed = [m for m in got if m is not None]
        if failed and self.rank == 0:
            self.log.warn(
                f"checkpoint.hf: no Hugging Face folder for this checkpoint ({failed[0]}); "
                "the checkpoint itself is committed: run export-hf on it"
            )
        return not failed
