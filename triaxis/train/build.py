"""Build the model for a layout: meta-device construction -> parallelize -> materialize -> init.

Without pipelining that is one Transformer. With pipelining it is this rank's stage modules,
each parallelized on its own, plus a `LocalStages` view that gives them the full model's names.
"""

from __future__ import annotations

import torch
from torch import nn

from triaxis.config import Config
from triaxis.model import ModelArgs, Transformer
from triaxis.model.moe import set_aux_scale
from triaxis.parallel.dims import ParallelDims
from triaxis.parallel.parallelize import parallelize
from triaxis.parallel.rules import pipeline_stages


def build_model(
    cfg: Config,
    args: ModelArgs,
    dims: ParallelDims,
    mesh,
    device: torch.device,
    mp_dtype: torch.dtype | None,
    grad_accum: int,
    loss_fn,
    log,
):
    """Returns (model, pipeline): `model` holds every parameter this rank trains under the
    single-device names; `pipeline` is None without pipelining."""
    init_device = "cpu" if cfg.parallel.cpu_offload else device
    if dims.fsdp_enabled:
        from triaxis.parallel.hierarchical import describe

        if line := describe(cfg.parallel.hierarchical, dims):
            log.info(line)
    if dims.pp == 1:
        # Build on meta: no rank ever allocates the full model, whatever the layout.
        with torch.device("meta"):
            model: nn.Module = Transformer(args)
        model = parallelize(model, dims, mesh, cfg.parallel, cfg.train, device, mp_dtype, cfg.lora)
        model.materialize(init_device)
        model.init_weights(cfg.train.seed)
        _init_lora(model, cfg)
        set_aux_scale(model, 1.0 / grad_accum)  # a step's aux term: the mean over micro-batches
        return model, None

    from triaxis.parallel.partition import format_table
    from triaxis.parallel.pipeline import LocalStages, Pipeline, build_stage_module

    stages = pipeline_stages(cfg, args, dims, grad_accum)
    log.info(
        f"pipeline: {len(stages)} stages over pp={dims.pp}, schedule "
        f"{cfg.parallel.pp_schedule}, {grad_accum} micro-batches per step\n" + format_table(stages)
    )
    pp_rank = dims.coords(torch.distributed.get_rank())["pp"]
    mine = sorted((s for s in stages if s.rank == pp_rank), key=lambda s: s.index)
    parts = [
        parallelize(
            build_stage_module(args, s, len(stages)),
            dims,
            mesh,
            cfg.parallel,
            cfg.train,
            device,
            mp_dtype,
            cfg.lora,
        )
        for s in mine
    ]
    model = LocalStages(parts)
    model.materialize(init_device)
    model.init_weights(cfg.train.seed)
    _init_lora(model, cfg)
    pipeline = Pipeline(
        parts,
        mine,
        len(stages),
        mesh["pp"].get_group(),
        cfg.parallel.pp_schedule,
        grad_accum,
        device,
        loss_fn,
    )
    return model, pipeline


def _init_lora(model: nn.Module, cfg: Config) -> None:
    if cfg.lora.enabled:
        from triaxis.parallel.lora import init_adapters

        init_adapters(model, cfg.train.seed)


def compute_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. bf16 = autocast (one process) or FSDP's mixed-precision policy."""
    if requested == "bf16" or (requested == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
