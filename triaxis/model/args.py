"""The model's shape and what follows from it alone: parameter counts and FLOPs per token.

No torch here: the planner (`triaxis plan`) counts the parameters and FLOPs of a 405B model from
these formulas without building or importing the model. The counting functions take anything
with the shape's attributes (`Sizes`): `ModelArgs`, or the planner's `ModelShape`, which can also
describe the published GPT-style models (a 2-matrix GELU MLP) that `ModelArgs` cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: str = "none"
    """none, or llama3: Llama 3.1's long-context frequency scaling (the four fields below)."""
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def mlp_matrices(self) -> int:
        """SwiGLU: w1, w3 and w2."""
        return 3


class Sizes(Protocol):
    """What the counts read: ModelArgs, or the planner's ModelShape."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int: ...

    @property
    def mlp_matrices(self) -> int: ...


# Biases and LayerNorm biases of GPT-style shapes are not counted (under 0.1% of any of them).


def block_param_count(a: Sizes) -> int:
    """One block: q, k, v, o, the MLP matrices and two norm weights."""
    attn = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)
    return attn + a.mlp_matrices * a.dim * a.ffn_dim + 2 * a.dim


def embedding_param_count(a: Sizes) -> int:
    return a.vocab_size * a.dim


def head_param_count(a: Sizes) -> int:
    """The LM head matrix (vocab x dim); it counts in the FLOPs even when tied (it is computed)."""
    return a.vocab_size * a.dim


def param_counts(a: Sizes) -> dict[str, int]:
    """Parameter counts: total (tied weights once), embedding, and non-embedding + LM head."""
    embedding = embedding_param_count(a)
    head = head_param_count(a)
    blocks = a.n_layers * block_param_count(a) + a.dim  # + final norm
    total = blocks + embedding + (0 if a.tie_embeddings else head)
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": blocks,
        "flops_params": blocks + head,
    }


def flops_per_token(a: Sizes, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·layers·d_model·seq, N = non-embedding params + head.

    6·N counts forward (2) and backward (4) matrix multiplies; 12·L·d·T the attention scores and
    weighted values (causal masking not discounted, as in the PaLM/nanoGPT convention).
    """
    n = param_counts(a)["flops_params"]
    return 6 * n + 12 * a.n_layers * a.dim * seq_len
