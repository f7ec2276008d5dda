"""The transformer shape the planner reasons about: sizes, parameter counts and FLOPs, no tensors.

The planner must also evaluate published GPT-style models (a 4h GELU MLP, multi-head attention,
dropout), which `ModelArgs` cannot describe (it has no GELU flag). So the planner works on its own
`ModelShape`, built from `ModelArgs` for triaxis models and written out directly for the published
rows. Its parameter and FLOP counts are the model's own (`triaxis.model.args`), applied to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from triaxis.errors import UserError, nearest
from triaxis.model.args import (ModelArgs, block_param_count, embedding_param_count,
                                flops_per_token, head_param_count, param_counts)


@dataclass(frozen=True)
class ModelShape:
    name: str
    """A label for reports: the preset name, the config file or the published model."""
    dim: int
    """Hidden size d_model (h)."""
    n_layers: int
    """Transformer blocks (l)."""
    n_heads: int
    """Attention heads (a)."""
    n_kv_heads: int
    """Key/value heads (= n_heads for multi-head attention)."""
    ffn_dim: int
    """Hidden size of the MLP (4h for GPT, ~3.5h for Llama's SwiGLU)."""
    vocab_size: int
    """Vocabulary size (V)."""
    gated_mlp: bool = True
    """True: SwiGLU, three MLP matrices (triaxis). False: GELU, two matrices (GPT)."""
    tie_embeddings: bool = False
    """The LM head shares the embedding matrix."""
    dropout: bool = False
    """GPT-style dropout after attention and MLP: its 1-byte masks are kept for backward."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    def block_params(self) -> int:
        """Parameters of one block: q, k, v, o, the MLP matrices and two norm weights."""
        return block_param_count(self)

    def embedding_params(self) -> int:
        return embedding_param_count(self)

    def head_params(self) -> int:
        """LM head (vocab x dim) + final norm; the head counts even when tied (it is computed)."""
        return head_param_count(self) + self.dim

    def total_params(self) -> int:
        return param_counts(self)["total"]

    def model_flops_per_token(self, seq_len: int) -> float:
        """6·N + 12·l·h·s (triaxis.model.args.flops_per_token)."""
        return float(flops_per_token(self, seq_len))

    def recompute_flops_per_token(self, seq_len: int, recomputed_layers: float) -> float:
        """The extra forward of checkpointed blocks: 2·block + 4·h·s per recomputed block."""
        return recomputed_layers * (2.0 * self.block_params() + 4.0 * self.dim * seq_len)


def shape_from_args(args: ModelArgs, name: str) -> ModelShape:
    return ModelShape(name=name, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_kv_heads, ffn_dim=args.ffn_dim,
                      vocab_size=args.vocab_size, gated_mlp=True,
                      tie_embeddings=args.tie_embeddings)


def args_from_shape(shape: ModelShape, max_seq_len: int = 8192) -> ModelArgs:
    """The triaxis ModelArgs of a gated (SwiGLU) shape: what `predict_state_bytes_per_rank` and
    the training runtime consume."""
    assert shape.gated_mlp, "triaxis models are SwiGLU; a GELU shape has no ModelArgs"
    return ModelArgs(dim=shape.dim, n_layers=shape.n_layers, n_heads=shape.n_heads,
                     n_kv_heads=shape.n_kv_heads, ffn_dim=shape.ffn_dim,
                     vocab_size=shape.vocab_size, max_seq_len=max_seq_len,
                     tie_embeddings=shape.tie_embeddings)


def load_model(model: str, vocab_size: int | None = None) -> tuple[ModelShape, ModelArgs]:
    """A preset name (tiny, 8b, 70b, ...) or a triaxis CONFIG.toml whose [model] section is used."""
    from triaxis.config import load_config
    from triaxis.model.presets import PRESETS, build_model_args

    if model.endswith(".toml") or Path(model).is_file():
        cfg = load_config(model)
        args = build_model_args(cfg.model, vocab_size=vocab_size)
        return shape_from_args(args, Path(model).name), args
    if model not in PRESETS:
        hint = nearest(model, list(PRESETS))
        fix = f"did you mean {hint!r}?" if hint else "or pass a CONFIG.toml"
        raise UserError(f"--model {model!r} is neither a preset nor a .toml file; presets are "
                        f"{list(PRESETS)}; {fix}")
    args = dataclasses.replace(PRESETS[model])
    if vocab_size:
        args.vocab_size = vocab_size
    return shape_from_args(args, model), args
