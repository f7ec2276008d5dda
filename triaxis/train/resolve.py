"""Resolve a config against a world size before anything is built: the data, the model shape
and the layout together (the launcher runs it too). The layout rules themselves are
`parallel.rules.check_layout`, the one copy every backend calls."""

from __future__ import annotations

import os

from triaxis import storage, storage_client
from triaxis.config import Config
from triaxis.data.dataset import TokenDataset
from triaxis.data.mixture import open_train_data
from triaxis.data.synthetic import SYNTHETIC, SyntheticDataset
from triaxis.errors import UserError
from triaxis.model import build_model_args
from triaxis.parallel.dims import ParallelDims
from triaxis.parallel.rules import Planner, layout_for_world


def resolve(
    cfg: Config, world_size: int, planner: Planner | None = None
) -> tuple[Config, ParallelDims, object, TokenDataset, str]:
    """Check everything that can be checked before any process group or model exists:
    degrees against the world size, the data, the model shape. Used by the launcher too, so a
    bad config fails once, in one line, instead of once per rank. With parallel.auto the
    planner fills in the layout first: the config returned is the one to run (a new one; cfg is
    left as it was), and the last value says why it chose it ("" otherwise)."""
    if cfg.data.path == SYNTHETIC and not cfg.data.sources:
        model_args = build_model_args(cfg.model)
        train_ds = SyntheticDataset(model_args.vocab_size, cfg.data.seq_len, cfg.data.seed)
    else:
        train_ds = open_train_data(cfg)  # data.path, or the data.sources mixture
    vocab = train_ds.manifest["tokenizer"]["vocab_size"]
    if cfg.data.document_mask and train_ds.manifest["tokenizer"].get("eos_id") is None:
        raise UserError(
            f"data.document_mask=true needs an end-of-document token, but the data at "
            f"{cfg.data.path} has none (tokenizer {train_ds.manifest['tokenizer']['kind']}); "
            "prepare the data with `triaxis prepare` or set --data.document_mask=false"
        )
    model_args = build_model_args(cfg.model, vocab_size=vocab)
    if model_args.vocab_size < vocab:
        raise UserError(
            f"model.vocab_size={model_args.vocab_size} is smaller than the data's "
            f"tokenizer vocabulary {vocab}; leave model.vocab_size unset "
            "(--model.vocab_size=none) to take it from the data"
        )
    cfg, dims, why = layout_for_world(cfg, world_size, model_args, planner)
    storage_client.check_location(cfg.checkpoint_dir(), "checkpoint.dir")
    return cfg, dims, model_args, train_ds, why


def recorded_data_path(cfg: Config) -> str:
    """The data folder a checkpoint records for `generate` (its tokenizer): absolute, so it is
    found from any directory (s3:// and synthetic as they are)."""
    path = cfg.data.tokenizer_path()
    if path == SYNTHETIC or storage.is_remote(path):
        return path
    return os.path.abspath(path)
