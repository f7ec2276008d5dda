"""The layout rules in one place: degrees, model shape, batch and pipeline schedule against a
world size. Every launcher backend (local, torchrun, Slurm, SageMaker, dry run or not) and the
trainer call `check_layout`, so a layout one of them refuses, all refuse with the same line.

Pure: no data, no storage, no process group; torch only for a pipelined layout (the schedule
classes of this PyTorch)."""

from __future__ import annotations

from collections.abc import Callable

from triaxis.config import Config, grad_accum_steps, validate
from triaxis.errors import UserError
from triaxis.model.args import ModelArgs
from triaxis.parallel.dims import ParallelDims
from triaxis.parallel.partition import PartitionInputs, Stage, parse_layers, partition


def check_layout(cfg: Config, world: int, model_args: ModelArgs) -> ParallelDims:
    """Raise UserError (one line: the value, the rule, the fix) unless cfg's layout runs on
    `world` ranks with this model; return its degrees."""
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world, p.fsdp_always, p.cp, p.ep)
    if dims.ep > 1 and not model_args.n_experts:
        raise UserError(
            f"parallel.ep={dims.ep} on a dense model (model.n_experts=0): expert parallelism "
            "splits a mixture of experts; set --parallel.ep=1 or pick an MoE model"
        )
    if dims.ep > 1 and model_args.n_experts % dims.ep:
        ok = [d for d in range(1, model_args.n_experts + 1) if model_args.n_experts % d == 0]
        raise UserError(
            f"parallel.ep={dims.ep} does not divide model.n_experts={model_args.n_experts} "
            f"(each ep rank holds whole experts); choose ep in {ok}"
        )
    validate(cfg, model_args, dims)
    if cfg.lora.enabled:
        check_lora(cfg, model_args, dims)
    if dims.pp > 1:
        from triaxis.parallel.pipeline import check_schedule  # torch: only when pipelining

        if model_args.tie_embeddings:
            raise UserError(
                f"model.tie_embeddings=true with parallel.pp={dims.pp}: the embedding "
                "(first stage) and the LM head (last stage) live on different ranks; "
                "set --model.tie_embeddings=false"
            )
        grad_accum = grad_accum_steps(cfg, dims.dp_size)
        check_schedule(p.pp_schedule, dims.pp, p.pp_virtual_stages, grad_accum)
        pipeline_stages(cfg, model_args, dims, grad_accum)  # refuses impossible splits
    elif p.pp_virtual_stages != 1 or p.pp_layers:
        raise UserError("parallel.pp_virtual_stages / pp_layers need parallel.pp > 1")
    return dims


Planner = Callable[[Config, int, ModelArgs], "tuple[Config, str]"]
"""parallel.auto's planner: (cfg, world, model_args) -> (cfg with the chosen layout, why). It
lives above the trainer (triaxis.plan.auto.auto_layout); the command line passes it down."""


def layout_for_world(
    cfg: Config, world: int, model_args: ModelArgs, planner: Planner | None = None
) -> tuple[Config, ParallelDims, str]:
    """The layout that runs on `world` ranks: cfg's own, or with parallel.auto the planner's
    (a new Config; cfg is left as it was), checked. Returns (cfg, dims, why the planner chose
    it or "")."""
    why = ""
    if cfg.parallel.auto != "off":
        if planner is None:
            raise UserError(
                f"parallel.auto={cfg.parallel.auto} needs the planner, which this "
                "caller did not pass; run `triaxis train` / `triaxis launch`, or "
                "set --parallel.auto=off and give the degrees"
            )
        cfg, why = planner(cfg, world, model_args)
    return cfg, check_layout(cfg, world, model_args), why


def pipeline_stages(
    cfg: Config, args: ModelArgs, dims: ParallelDims, grad_accum: int
) -> list[Stage]:
    """The pipeline's stages for this layout (raises UserError for an impossible split)."""
    p = cfg.parallel
    inputs = PartitionInputs(
        args=args,
        pp=dims.pp,
        virtual_stages=p.pp_virtual_stages,
        schedule=p.pp_schedule,
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.train.micro_batch,
        n_microbatches=grad_accum,
        shard_degree=dims.dp_shard * dims.tp,
        tp=dims.tp,
        full_recompute=p.activation_checkpoint == "full",
    )
    return partition(inputs, p.pp_memory_weight, parse_layers(p.pp_layers))


def check_lora(cfg: Config, model_args: ModelArgs, dims: ParallelDims) -> None:
    """LoRA's targets against the full model (built on meta: no memory) and the layout."""
    import torch

    from triaxis.model import Transformer
    from triaxis.parallel.lora import check_targets

    with torch.device("meta"):
        model = Transformer(model_args)
    check_targets(cfg.lora, model, dims.tp)
