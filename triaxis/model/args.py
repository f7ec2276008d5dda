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
    # Mixture of experts (triaxis.model.moe); n_experts = 0: every block a dense SwiGLU MLP.
    n_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_dim: int = 0
    """Hidden size of one expert (0: ffn_dim)."""
    n_shared_experts: int = 0
    moe_first_dense: int = 0
    """The first this many blocks keep the dense MLP (DeepSeek-style)."""
    moe_capacity_factor: float = 0.0
    """0: dropless."""
    moe_aux_loss_coef: float = 0.0
    moe_bias_update_rate: float = 0.0
    moe_norm_topk: bool = True
    head_size: int = 0
    """Size of one attention head (0: dim / n_heads); Qwen3 sets it apart from dim."""
    qk_norm: bool = False
    """RMSNorm over each head of q and of k before RoPE (Qwen3)."""

    def __post_init__(self):
        if self.n_experts and not self.moe_ffn_dim:
            self.moe_ffn_dim = self.ffn_dim

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def mlp_matrices(self) -> int:
        """SwiGLU: w1, w3 and w2."""
        return 3

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.moe_first_dense


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
    qk_norm = 2 * a.head_dim if getattr(a, "qk_norm", False) else 0
    return attn + a.mlp_matrices * a.dim * a.ffn_dim + 2 * a.dim + qk_norm


def embedding_param_count(a: Sizes) -> int:
    return a.vocab_size * a.dim


def head_param_count(a: Sizes) -> int:
    """The LM head matrix (vocab x dim); it counts in the FLOPs even when tied (it is computed)."""
    return a.vocab_size * a.dim


def moe_layer_extra(a: Sizes) -> tuple[int, int]:
    """(all, active) parameters an MoE block has beyond a dense one: its router, experts and
    shared experts in place of the dense MLP; active = what one token's compute touches."""
    n_experts = getattr(a, "n_experts", 0)
    if not n_experts:
        return 0, 0
    expert = a.mlp_matrices * a.dim * a.moe_ffn_dim
    common = a.dim * n_experts + a.n_shared_experts * expert - a.mlp_matrices * a.dim * a.ffn_dim
    return common + n_experts * expert, common + a.moe_top_k * expert


def param_counts(a: Sizes) -> dict[str, int]:
    """Parameter counts: total (tied weights once), embedding, and non-embedding + LM head.
    flops_params counts the experts a token is routed to (k of them), the others not."""
    embedding = embedding_param_count(a)
    head = head_param_count(a)
    n_moe = a.n_layers - min(a.n_layers, a.moe_first_dense) if getattr(a, "n_experts", 0) else 0
    extra_all, extra_active = moe_layer_extra(a)
    blocks = a.n_layers * block_param_count(a) + a.dim  # + final norm
    total = blocks + n_moe * extra_all + embedding + (0 if a.tie_embeddings else head)
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": blocks + n_moe * extra_all,
        "flops_params": blocks + n_moe * extra_active + head,
    }


def flops_per_token(a: Sizes, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·layers·d_model·seq, N = non-embedding params + head.

    6·N counts forward (2) and backward (4) matrix multiplies; 12·L·d·T the attention scores and
    weighted values (causal masking not discounted, as in the PaLM/nanoGPT convention).
    """
    n = param_counts(a)["flops_params"]
    return 6 * n + 12 * a.n_layers * a.dim * seq_len
