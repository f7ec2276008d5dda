"""Model shapes. `tiny` for tests, `small` for the CPU demo, Llama-3 shapes for real runs."""

from __future__ import annotations

import dataclasses

from triaxis.errors import UserError, nearest
from triaxis.model.args import ModelArgs

SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len")
"""The integer sizes every preset sets and the [model] section may override (all positive)."""

_TINY_MOE = dict(
    n_experts=4, moe_top_k=2, moe_ffn_dim=96, n_shared_experts=1, moe_first_dense=1,
    moe_aux_loss_coef=0.01,
)  # fmt: skip
_MIXTRAL = dict(n_experts=8, moe_top_k=2, moe_aux_loss_coef=0.02)
_QWEN3_MOE = dict(
    n_experts=128, moe_top_k=8, moe_ffn_dim=768, moe_aux_loss_coef=0.001, head_size=128,
    qk_norm=True, rope_theta=1e6,
)  # fmt: skip
MOE_FIELDS = (
    "n_experts",
    "moe_top_k",
    "moe_ffn_dim",
    "n_shared_experts",
    "moe_first_dense",
    "moe_capacity_factor",
    "moe_aux_loss_coef",
    "moe_bias_update_rate",
    "moe_norm_topk",
)
"""The [model] fields of a mixture of experts; set ones override the preset's."""

# One row a preset, in SHAPE's order; then what differs from ModelArgs' defaults.
_ROWS: list[tuple[str, tuple[int, ...], dict]] = [
    # name   (dim, layers, heads, kv heads, ffn, vocab, seq)
    ("tiny", (64, 4, 4, 2, 192, 512, 256), {"rope_theta": 10000.0}),
    # tiny with 4 experts (top 2, one shared) after a dense first block: the MoE tests' model.
    ("tiny-moe", (64, 4, 4, 2, 192, 512, 256), {"rope_theta": 10000.0, **_TINY_MOE}),
    # ~12M parameters with an 8k BPE vocabulary: trains visibly in minutes on two CPU cores.
    ("small", (384, 6, 6, 2, 1024, 8192, 1024), {"rope_theta": 10000.0, "tie_embeddings": True}),
    # Llama-3.2-1B, then the Llama-3.1 shapes.
    ("1b", (2048, 16, 32, 8, 8192, 128256, 8192), {"tie_embeddings": True}),
    ("8b", (4096, 32, 32, 8, 14336, 128256, 8192), {}),
    ("70b", (8192, 80, 64, 8, 28672, 128256, 8192), {}),
    ("405b", (16384, 126, 128, 8, 53248, 128256, 8192), {}),
    # Mixtral-8x7B: 8 experts, top 2, every block MoE.
    ("mixtral-8x7b", (4096, 32, 32, 8, 14336, 32000, 32768), {"rope_theta": 1e6, **_MIXTRAL}),
    # Qwen3-30B-A3B: 128 experts of 768, top 8, every block MoE, 128-wide heads with q/k norms.
    ("qwen3-30b-a3b", (2048, 48, 32, 4, 6144, 151936, 40960), _QWEN3_MOE),
]
PRESETS: dict[str, ModelArgs] = {
    name: ModelArgs(**dict(zip(SHAPE, sizes)), **extra) for name, sizes, extra in _ROWS
}


def build_model_args(model_cfg, vocab_size: int | None = None) -> ModelArgs:
    """Preset, overridden by every set (not None) field of the [model] section (and the data's
    vocabulary when model.vocab_size is unset)."""
    if model_cfg.preset not in PRESETS:
        hint = nearest(model_cfg.preset, list(PRESETS))
        fix = f"did you mean {hint!r}?" if hint else ""
        raise UserError(
            f"model.preset={model_cfg.preset!r} is unknown; choose one of "
            f"{list(PRESETS)} {fix}".rstrip()
        )
    args = dataclasses.replace(PRESETS[model_cfg.preset])
    for name in (*SHAPE, "rope_theta"):
        value = getattr(model_cfg, name)
        if value is not None:
            setattr(args, name, value)
    if model_cfg.tie_embeddings is not None:
        args.tie_embeddings = model_cfg.tie_embeddings
    if model_cfg.rope_scaling is not None:
        args.rope_scaling = model_cfg.rope_scaling
    for name in (
        "rope_scaling_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_seq_len",
    ):
        setattr(args, name, getattr(model_cfg, name))
    args.norm_eps = model_cfg.norm_eps
    if model_cfg.head_dim is not None:
        args.head_size = model_cfg.head_dim
    if model_cfg.qk_norm is not None:
        args.qk_norm = model_cfg.qk_norm
    for name in MOE_FIELDS:
        if getattr(model_cfg, name) is not None:
            setattr(args, name, getattr(model_cfg, name))
    if args.n_experts and not args.moe_ffn_dim:
        args.moe_ffn_dim = args.ffn_dim
    if vocab_size and model_cfg.vocab_size is None:
        args.vocab_size = vocab_size
    _check(args)
    return args


def _check(a: ModelArgs) -> None:
    for name in SHAPE:
        if getattr(a, name) <= 0:
            raise UserError(f"model.{name}={getattr(a, name)} must be positive")
    if a.rope_theta <= 0:
        raise UserError(f"model.rope_theta={a.rope_theta} must be positive (Llama 3: 500000)")
    if a.dim % a.n_heads and not a.head_size:
        raise UserError(
            f"model.dim={a.dim} is not divisible by model.n_heads={a.n_heads}; "
            f"pick n_heads among the divisors of {a.dim}, or set model.head_dim"
        )
    if a.head_dim % 2:
        raise UserError(
            f"head dim {a.head_dim} (model.head_dim, or dim/n_heads) must be even for RoPE"
        )
    if a.n_heads % a.n_kv_heads:
        raise UserError(
            f"model.n_kv_heads={a.n_kv_heads} does not divide "
            f"model.n_heads={a.n_heads}; choose a divisor of {a.n_heads}"
        )
    _check_rope_scaling(a)
    _check_moe(a)


def _check_moe(a: ModelArgs) -> None:
    if not a.n_experts:
        return
    if not 1 <= a.moe_top_k <= a.n_experts:
        raise UserError(
            f"model.moe_top_k={a.moe_top_k} must be between 1 and "
            f"model.n_experts={a.n_experts}; route each token to at most {a.n_experts} experts"
        )
    if a.moe_first_dense >= a.n_layers:
        raise UserError(
            f"model.moe_first_dense={a.moe_first_dense} leaves no MoE block among "
            f"model.n_layers={a.n_layers}; choose at most {a.n_layers - 1}, or n_experts = 0"
        )


def _check_rope_scaling(a: ModelArgs) -> None:
    if a.rope_scaling not in ("none", "llama3"):
        hint = nearest(a.rope_scaling, ["none", "llama3"])
        raise UserError(
            f"model.rope_scaling={a.rope_scaling!r} is unknown; use none or llama3"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    if a.rope_scaling == "none":
        return
    if a.rope_scaling_factor < 1:
        raise UserError(
            f"model.rope_scaling_factor={a.rope_scaling_factor} must be >= 1 (it "
            "divides the low frequencies; Llama 3.1 uses 8)"
        )
    if not 0 < a.rope_low_freq_factor < a.rope_high_freq_factor:
        raise UserError(
            f"model.rope_low_freq_factor={a.rope_low_freq_factor} and "
            f"model.rope_high_freq_factor={a.rope_high_freq_factor} must satisfy "
            "0 < low < high (Llama 3.1: 1 and 4)"
        )
    if a.rope_original_max_seq_len <= 0:
        raise UserError(
            f"model.rope_original_max_seq_len={a.rope_original_max_seq_len} must be "
            "positive (Llama 3.1: 8192)"
        )
