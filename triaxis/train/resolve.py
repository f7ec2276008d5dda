"""Resolve a config against a world size before anything is built: one place for every check
that needs the data, the model shape and the degrees together (the launcher runs it too)."""

from __future__ import annotations

from triaxis import storage
from triaxis.config import Config, grad_accum_steps, validate
from triaxis.data.dataset import SYNTHETIC, SyntheticDataset, TokenDataset
from triaxis.errors import UserError
from triaxis.model import build_model_args
from triaxis.parallel.dims import ParallelDims
from triaxis.train.build import pipeline_stages


def resolve(cfg: Config, world_size: int) -> tuple[ParallelDims, object, TokenDataset, str]:
    """Check everything that can be checked before any process group or model exists:
    degrees against the world size, the data, the model shape. Used by the launcher too, so a
    bad config fails once, in one line, instead of once per rank. With parallel.auto the planner
    fills in the layout first; the last value returned says why it chose it ("" otherwise)."""
    p = cfg.parallel
    if cfg.data.path == SYNTHETIC:
        model_args = build_model_args(cfg.model)
        train_ds = SyntheticDataset(model_args.vocab_size, cfg.data.seq_len, cfg.data.seed)
    else:
        train_ds = TokenDataset(cfg.data.path, "train", cfg.data.seq_len, cfg.data.seed,
                                cache_dir=cfg.data.cache_dir, cache_gib=cfg.data.cache_gib,
                                shuffle_shards=cfg.data.shuffle_shards, verify=cfg.data.verify)
    vocab = train_ds.manifest["tokenizer"]["vocab_size"]
    model_args = build_model_args(cfg.model, vocab_size=vocab)
    if model_args.vocab_size < vocab:
        raise UserError(f"model.vocab_size={model_args.vocab_size} is smaller than the data's "
                        f"tokenizer vocabulary {vocab}; leave model.vocab_size unset "
                        "(--model.vocab_size=none) to take it from the data")
    why = ""
    if p.auto != "off":
        from triaxis.plan.auto import plan_for_world

        _, why = plan_for_world(cfg, world_size, p.auto, model_args=model_args)
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world_size, p.fsdp_always)
    validate(cfg, model_args, dims)
    storage.check_location(cfg.checkpoint_dir(), "checkpoint.dir")
    if dims.pp > 1:
        from triaxis.parallel.pipeline import check_schedule

        if model_args.tie_embeddings:
            raise UserError(f"model.tie_embeddings=true with parallel.pp={dims.pp}: the embedding "
                            "(first stage) and the LM head (last stage) live on different ranks; "
                            "set --model.tie_embeddings=false")
        grad_accum = grad_accum_steps(cfg, dims.dp_size)
        check_schedule(p.pp_schedule, dims.pp, p.pp_virtual_stages, grad_accum)
        pipeline_stages(cfg, model_args, dims, grad_accum)  # refuses impossible splits
    elif p.pp_virtual_stages != 1 or p.pp_layers:
        raise UserError("parallel.pp_virtual_stages / pp_layers need parallel.pp > 1")
    return dims, model_args, train_ds, why
