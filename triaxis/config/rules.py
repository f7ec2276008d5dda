"""The rules between fields, in one place: each error names the value, the rule and the fix."""

from __future__ import annotations

from triaxis.config.load import check_config
from triaxis.config.sections import Config, DataConfig, ParallelConfig
from triaxis.errors import UserError

# ---------------------------------------------------------------------------------------------
# Validation: every cross-field rule, in one place.


def validate(cfg: Config, model_args=None, dims=None) -> None:
    """Raise UserError naming the value, the rule and the fix. `model_args` and `dims` (the
    resolved model shape and parallel degrees) enable the rules that need them."""
    check_config(cfg)
    t, d, p = cfg.train, cfg.data, cfg.parallel
    if cfg.checkpoint.resume not in ("auto", "none"):
        raise UserError(f"checkpoint.resume={cfg.checkpoint.resume!r}: use auto or none")
    if p.loss_parallel and p.tp == 1:
        raise UserError(
            "parallel.loss_parallel=true needs parallel.tp > 1; set tp or drop loss_parallel"
        )
    if t.float8 == "auto" and p.auto == "off":
        # Only the planner prices FP8 against the layout; a fixed layout has no one to ask.
        raise UserError(
            "train.float8='auto' with parallel.auto=off: the FP8 choice is made by the layout "
            "planner; set --parallel.auto=speed (or memory), or pick --train.float8="
            "off|tensorwise|rowwise (`triaxis plan --float8 auto` says which pays)"
        )
    if t.float8 in ("tensorwise", "rowwise"):
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            raise UserError(
                f"train.float8={t.float8!r} needs torchao, which is not installed; "
                "pip install 'triaxis[float8]' or set --train.float8=off"
            )
        if t.float8 == "rowwise" and t.dtype == "fp32":
            # cuBLAS's row-scaled float8 GEMM writes bf16 only.
            raise UserError(
                "train.float8='rowwise' with train.dtype='fp32': row-scaled float8 GEMMs "
                "produce bf16 only; set --train.dtype=bf16 (or auto) or --train.float8=tensorwise"
            )
    if (problem := tracker_problem(cfg.metrics)) is not None:
        raise UserError(problem)
    if 0 < t.hang_timeout_s and t.hang_timeout_s >= t.dist_timeout_s:
        # The watchdog's stacks and Flight Recorder dumps come only if it fires first.
        raise UserError(
            f"train.hang_timeout_s={t.hang_timeout_s:g} is not below train.dist_timeout_s="
            f"{t.dist_timeout_s:g}: a stuck collective times out before the hang watchdog "
            "dumps anything; lower --train.hang_timeout_s or raise --train.dist_timeout_s"
        )
    if (problem := composition_problem(p, None if dims is None else dims.fsdp_enabled)) is not None:
        raise UserError(problem)
    if p.cp > 1 and d.seq_len % (2 * p.cp):
        ok = max(2 * p.cp, d.seq_len // (2 * p.cp) * 2 * p.cp)
        raise UserError(
            f"data.seq_len={d.seq_len} is not divisible by 2 x parallel.cp = {2 * p.cp} (each cp "
            f"rank holds two equal head-tail chunks); set --data.seq_len={ok} or another cp"
        )
    if d.mean_document_tokens and not d.document_mask:
        raise UserError(
            f"data.mean_document_tokens={d.mean_document_tokens} counts masked attention "
            "FLOPs, but data.document_mask=false; set --data.document_mask=true or drop it"
        )
    c = cfg.checkpoint
    if c.memory_interval and c.interval and c.memory_interval > c.interval:
        # Every memory copy would be of a step the durable tier already holds as new or newer.
        raise UserError(
            f"checkpoint.memory_interval={c.memory_interval} is over checkpoint.interval="
            f"{c.interval}: the memory tier would never hold a newer step than the durable one; "
            f"set --checkpoint.memory_interval to at most {c.interval} (e.g. "
            f"{max(1, c.interval // 10)}) or 0 to turn it off"
        )
    if c.hf != "off" and model_args is not None and getattr(model_args, "n_experts", 0):
        raise UserError(
            f"checkpoint.hf={c.hf!r} with model.n_experts={model_args.n_experts}: the Hugging "
            "Face writer handles dense Llama models only; set --checkpoint.hf=off"
        )
    if model_args is not None and d.seq_len > model_args.max_seq_len:
        raise UserError(
            f"data.seq_len={d.seq_len} is over the model's maximum "
            f"max_seq_len={model_args.max_seq_len}; lower data.seq_len or raise "
            f"--model.max_seq_len"
        )
    if dims is not None:
        if model_args is not None:
            dims.check_model(model_args.n_heads, model_args.n_kv_heads, model_args.n_layers)
            if getattr(model_args, "qk_norm", False) and dims.tp > 1:
                # Its weight would see only this rank's heads: a partial gradient under tp.
                raise UserError(
                    f"model.qk_norm=true with parallel.tp={dims.tp}: the per-head q/k norms are "
                    "not tensor-parallel yet; use parallel.tp=1 (shard with dp_shard, pp or cp)"
                )
        per_step = t.micro_batch * dims.dp_size
        if t.global_batch % per_step:
            ok = t.global_batch // per_step * per_step or per_step
            raise UserError(
                f"train.global_batch={t.global_batch} is not a multiple of micro_batch x dp = "
                f"{t.micro_batch} x {dims.dp_size} = {per_step}; set train.global_batch={ok} "
                f"or a smaller train.micro_batch"
            )


SPLIT_BACKWARD_SCHEDULES = ("interleaved-zb", "zbv", "dualpipev")
"""Pipeline schedules that run each stage's backward as two passes over one autograd graph:
input gradients first (sent on at once), weight gradients later."""


def tracker_problem(mc) -> str | None:
    """The one-line error for a tracker the config asks for whose package is not installed."""
    import importlib.util

    if mc.mlflow and importlib.util.find_spec("mlflow") is None:
        return (
            f"metrics.mlflow={mc.mlflow!r} needs mlflow, which is not installed; "
            "pip install 'triaxis[mlflow]' or set --metrics.mlflow=''"
        )
    if mc.mlflow.startswith("arn:") and importlib.util.find_spec("sagemaker_mlflow") is None:
        return (
            f"metrics.mlflow={mc.mlflow!r} is a SageMaker MLflow ARN, which needs the "
            "sagemaker-mlflow plugin; pip install 'triaxis[mlflow]' sagemaker-mlflow"
        )
    if mc.wandb and importlib.util.find_spec("wandb") is None:
        return (
            f"metrics.wandb={mc.wandb!r} needs wandb, which is not installed; "
            "pip install 'triaxis[wandb]' or set --metrics.wandb=''"
        )
    return None


def composition_problem(p: ParallelConfig, fsdp: bool | None = None) -> str | None:
    """Why options that are each valid cannot run together (one line: the values, the rule,
    the fix), or None. The one rule for what composes: `validate` (so `check_layout`, every
    launcher backend and the trainer) raises it, and the planner (plan.search) never emits a
    layout it refuses; tests/test_composition.py walks every pair of the searched options.
    `fsdp`: whether FSDP wraps the model (ParallelDims.fsdp_enabled); None: judged from the
    explicit degrees (dp_shard=-1 is not resolved yet: check_layout judges it again)."""
    if fsdp is None:
        fsdp = p.fsdp_always or p.dp_replicate > 1 or p.dp_shard > 1 or p.cp > 1
    if p.cp > 1 and p.hierarchical == "on":
        return (
            f"parallel.hierarchical=on with parallel.cp={p.cp}: the two-phase gathers cover "
            "dp_shard groups, not FSDP's dp_shard x cp group; set --parallel.hierarchical=auto "
            "(flat gathers) or --parallel.cp=1"
        )
    if p.activation_offload and (
        p.activation_checkpoint == "none"
        or (p.activation_checkpoint == "selective" and p.ac_selective == "op")
    ):
        return (
            f"parallel.activation_offload=true offloads the inputs checkpointed blocks save, "
            f"but activation_checkpoint={p.activation_checkpoint!r}"
            + (
                f" with ac_selective={p.ac_selective!r}"
                if p.activation_checkpoint != "none"
                else ""
            )
            + " checkpoints no whole block; set parallel.activation_checkpoint=full or drop "
            "activation_offload"
        )
    op_level = p.activation_checkpoint == "selective" and p.ac_selective == "op"
    if op_level and p.pp > 1 and p.pp_schedule in SPLIT_BACKWARD_SCHEDULES:
        # torch.utils.checkpoint's selective policy frees what it recomputed after the first
        # backward through a block: the weight-gradient pass then fails ("backward an extra
        # time") at step 1.
        return (
            f"parallel.pp_schedule={p.pp_schedule} splits each backward into an input-gradient "
            "and a weight-gradient pass, but activation_checkpoint=selective with "
            "ac_selective=op recomputes a block for one backward pass only; use "
            "--parallel.ac_selective=block or --parallel.activation_checkpoint=full, or "
            "pp_schedule=1f1b / interleaved-1f1b"
        )
    split = p.pp > 1 and p.pp_schedule in SPLIT_BACKWARD_SCHEDULES
    if split and fsdp and p.reshard_after_forward:
        # Measured at pp=2 x dp_shard=2, AC none/selective/full alike (tests/test_composition.py):
        # the losses leave the one-process run's from step 2 on, while
        # reshard_after_forward=false matches it. Cause not isolated (torch's schedule runs
        # the weight-gradient pass, and FSDP's unshard/reshard/reduce actions, itself).
        return (
            f"parallel.pp_schedule={p.pp_schedule} with FSDP and reshard_after_forward=true "
            "does not train like one process (its losses drift from step 2 on); set "
            "--parallel.reshard_after_forward=false, or pp_schedule=1f1b / interleaved-1f1b"
        )
    return None


def attention_span(d: DataConfig) -> int:
    """Keys per query that attention FLOPs count: the window, or with document masking the
    expected document length (data.mean_document_tokens) when it is shorter."""
    if d.document_mask and d.mean_document_tokens:
        return min(d.seq_len, d.mean_document_tokens)
    return d.seq_len


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    return cfg.train.global_batch // (cfg.train.micro_batch * dp_size)
