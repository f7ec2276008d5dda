"""`triaxis train --parallel.auto=speed|memory`: plan for the world size at hand and apply it.

    cfg, plan, why = plan_for_world(cfg, world_size, "speed")

Picks the hardware profile from what the process sees: the named `gpu`, else the CUDA device
(A100 40/80 GB, H100, H200 by name and memory), else the `cpu` profile. The cpu profile models
gloo processes on one host: fp32 compute (4-byte activations, no bf16 copies, no offload), a
nominal FLOP rate (only the ranking between layouts matters), and memory = this host's memory /
processes per node, read at run time.

The layout is the whole of what `triaxis plan` prints for the same problem -- degrees, pipeline
schedule, stages per rank and the stage split (parallel.pp_layers), checkpointing, offload,
micro-batch -- mapped onto [parallel] by the one function the plan's TOML snippet uses
(mapping.parallel_config). A pipeline is considered whenever the model's embeddings are untied
(the trainer refuses pp > 1 with tied ones).
"""

from __future__ import annotations

import dataclasses
import os

from triaxis.config import Config, attention_span
from triaxis.errors import UserError
from triaxis.model.args import ModelArgs
from triaxis.plan.float8 import RECIPES
from triaxis.plan.hardware import GIB, load_catalog, resolve_hardware
from triaxis.plan.mapping import parallel_config
from triaxis.plan.problem import LoraPlan, Plan, Problem, shape_from_args
from triaxis.plan.report import explain, no_fit_message
from triaxis.plan.runtimes import RUNTIMES
from triaxis.plan.search import SearchSpace, plan


def detect_gpu(device: str) -> str:
    """The hardware profile of this process's accelerator: a100-40g, a100-80g, h100, h200, cpu."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    mem_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100"
    if "A100" in name:
        return "a100-80g" if mem_gib > 60 else "a100-40g"
    raise UserError(
        f"GPU {name!r} has no hardware profile; pass gpu= one of a100-40g, a100-80g, "
        "h100, h200, or add a [gpu.NAME] table with --hardware FILE"
    )


def plan_for_world(
    cfg: Config,
    world_size: int,
    objective: str,
    gpu: str | None = None,
    *,
    model_args: ModelArgs | None = None,
    cluster: str | None = None,
    gpus_per_node: int | None = None,
    hardware: str | None = None,
) -> tuple[Config, Plan, str]:
    """Choose the best layout of `world_size` ranks for cfg's model, seq_len and global batch;
    return (a copy of cfg with that parallel section and train.micro_batch, plan, explanation).
    cfg itself is left as it was.

    model_args: the resolved model (with the data's vocabulary); default: from cfg.model.
    gpus_per_node: default LOCAL_WORLD_SIZE (torchrun), else all ranks on one host for CPU and
    min(world_size, visible GPUs) on GPU.
    """
    from triaxis.model.presets import build_model_args

    args = model_args or build_model_args(cfg.model)
    gpu = gpu or detect_gpu(cfg.train.device)
    catalog = load_catalog(hardware)
    if gpus_per_node is None:
        local = os.environ.get("LOCAL_WORLD_SIZE")
        gpus_per_node = (
            int(local)
            if local
            else (world_size if gpu == "cpu" else min(world_size, _visible_gpus()))
        )
    hw = resolve_hardware(catalog, gpu, cluster, max(1, gpus_per_node))
    if cfg.train.dtype == "fp32" and hw.gpu.bf16:
        hw = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, bf16=False))
    problem = Problem(
        shape_from_args(args, cfg.model.preset),
        hw,
        RUNTIMES["triaxis"],
        cfg.data.seq_len,
        cfg.train.global_batch,
        attention_span=attention_span(cfg.data),
        lora=_lora_plan(cfg),
        # A given recipe is priced at the FP8 rate where the GPU has one; elsewhere (the cpu
        # profile: torchao's emulation) it runs as fast as high precision, for ranking.
        float8=cfg.train.float8 if cfg.train.float8 in RECIPES and hw.gpu.fp8_flops else "off",
        float8_min_dim=cfg.train.float8_min_dim,
    )
    space = SearchSpace(
        allow_offload=hw.gpu.bf16,
        max_micro_batch=cfg.train.global_batch,
        max_cp=0,
    )
    result, float8_note = _plan(problem, world_size, objective, space, catalog, cfg.train)
    if not result.plans:
        raise UserError("parallel.auto: " + no_fit_message(result))
    best = result.plans[0]
    a = best.layout
    parallel = parallel_config(a, args.n_layers, cfg.parallel)
    train = dataclasses.replace(cfg.train, micro_batch=a.micro_batch, float8=result.problem.float8)
    planned = dataclasses.replace(cfg, parallel=parallel, train=train)
    why = (
        f"parallel.auto={objective} on {world_size} x {hw.gpu.name}: {a.describe()} "
        f"(predicted {best.time.total:.3g} s/step, peak {best.memory.total / GIB:.2f} GiB "
        f"per rank of {hw.usable_memory_bytes / GIB:.1f} usable; {result.num_fit} of "
        f"{result.num_layouts} layouts fit). " + explain(result)
    )
    if float8_note:
        why += f" train.float8=auto -> {float8_note}."
    return planned, best, why


def _plan(problem: Problem, world: int, objective: str, space: SearchSpace, catalog, train):
    """(the planner's result, a note on train.float8=auto's choice or "")."""
    if train.float8 != "auto":
        return plan(problem, world, objective, space, keep=2, catalog=catalog), ""
    import importlib.util

    from triaxis.plan.float8_choice import plan_float8

    if problem.hw.gpu.fp8_flops > 0 and importlib.util.find_spec("torchao") is None:
        # Said in the log line, not silent: the run goes on in high precision.
        note = "float8 off: torchao is not installed (pip install 'triaxis[float8]')"
        return plan(problem, world, objective, space, keep=2, catalog=catalog), note
    # cuBLAS's row-scaled float8 GEMM writes bf16 only (config.rules refuses it under fp32).
    recipes = ("tensorwise",) if train.dtype == "fp32" else ("tensorwise", "rowwise")
    return plan_float8(problem, world, objective, space, 2, catalog, "auto", recipes)


def auto_layout(cfg: Config, world_size: int, model_args: ModelArgs) -> tuple[Config, str]:
    """The planner as the trainer and launcher take it (`parallel.rules.Planner`): cfg with
    the layout parallel.auto chooses for world_size, and why."""
    planned, _, why = plan_for_world(cfg, world_size, cfg.parallel.auto, model_args=model_args)
    return planned, why


def _visible_gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def _lora_plan(cfg) -> LoraPlan | None:
    if not cfg.lora.enabled:
        return None
    from triaxis.parallel.lora import patterns

    return LoraPlan(cfg.lora.rank, tuple(patterns(cfg.lora)))
