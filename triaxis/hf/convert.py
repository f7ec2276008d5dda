"""Hugging Face Llama <-> triaxis: parameter names, RoPE row order, config.json <-> ModelArgs.

Pure functions on names, tensors and dicts; no files. The one numerical difference between the
two models is where RoPE finds its pairs: triaxis (like Meta's reference code) rotates
interleaved pairs (x[2i], x[2i+1]) of each head, Hugging Face rotates halves (x[i],
x[i + head_dim/2]). The same model therefore stores the rows of wq and wk in a different order
per head, and converting permutes them (transformers' convert_llama_weights_to_hf.py `permute`).
"""

from __future__ import annotations

import re

import torch

from triaxis.errors import UserError
from triaxis.hf import moe
from triaxis.model.llama import ModelArgs

# Per-block names: Hugging Face suffix after `model.layers.{i}.` -> triaxis suffix after
# `layers.{i}.`
BLOCK_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    # Qwen3's per-head q/k norms (model.qk_norm)
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LM_HEAD = "lm_head.weight"
# Buffers some older exports saved; recomputed by both models, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TX_BLOCK = re.compile(r"layers\.(\d+)\.(.+)")
_BLOCK_BACK = {v: k for k, v in BLOCK_NAMES.items()}
_TOP_BACK = {v: k for k, v in TOP_NAMES.items()}


def hf_to_triaxis_name(name: str) -> str | None:
    """The triaxis parameter name of an HF tensor name; None for ignorable buffers."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    target = moe.hf_moe_target(name)
    if target is not None:
        return target[0]
    m = _HF_BLOCK.fullmatch(name)
    if m and m.group(2) in BLOCK_NAMES:
        return f"layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}"
    raise UserError(
        f"tensor {name!r} has no triaxis counterpart (a Llama checkpoint holds only "
        f"embed_tokens, q/k/v/o_proj, gate/up/down_proj, the norms and lm_head); "
        "is this a Llama-architecture model?"
    )


def triaxis_to_hf_name(name: str) -> str:
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = _TX_BLOCK.fullmatch(name)
    assert m and m.group(2) in _BLOCK_BACK, f"unexpected triaxis parameter {name}"
    return f"model.layers.{m.group(1)}.{_BLOCK_BACK[m.group(2)]}"


def rope_heads(triaxis_name: str, args: ModelArgs) -> int:
    """Heads whose rows RoPE rotates in this weight (wq: n_heads, wk: n_kv_heads; a q/k norm
    weight, which scales one head's positions before RoPE: 1); 0: none."""
    if triaxis_name.endswith("attention.wq.weight"):
        return args.n_heads
    if triaxis_name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    if triaxis_name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
        return 1
    return 0


def hf_rows_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(heads*hd, dim) rows (or a (hd,) vector) from HF's half-split order to interleaved
    pairs, per head."""
    if w.ndim == 1:
        return hf_rows_to_interleaved(w[:, None], n_heads)[:, 0]
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def interleaved_rows_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse: interleaved pairs -> HF's half-split order (transformers' `permute`)."""
    if w.ndim == 1:
        return interleaved_rows_to_hf(w[:, None], n_heads)[:, 0]
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelArgs

_MODEL_TYPES = ("llama", "mixtral", "qwen3", "qwen3_moe")
_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def _rope_params(cfg: dict) -> tuple[str | None, float | None, dict]:
    """(scaling type, theta, scaling parameters) from transformers 4.x (`rope_scaling`,
    `rope_theta`) or 5.x (`rope_parameters`) spelling; a non-default type in either wins."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kinds = [
        (params.get("rope_type"), params),
        (scaling.get("rope_type") or scaling.get("type"), scaling),
    ]
    kind, found = next(((k, d) for k, d in kinds if k not in (None, "default")), (None, {}))
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return kind, theta, found


_LLAMA3_KEYS = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_seq_len",
}
"""HF llama3 rope-scaling keys -> ModelArgs fields."""


def _llama3_fields(scaling: dict, where: str) -> dict:
    missing = [k for k in _LLAMA3_KEYS if scaling.get(k) is None]
    if missing:
        raise UserError(
            f"{where}: llama3 RoPE scaling lacks {', '.join(missing)}; a Llama 3.1 "
            "config has factor, low_freq_factor, high_freq_factor and "
            "original_max_position_embeddings"
        )
    fields = {field: scaling[key] for key, field in _LLAMA3_KEYS.items()}
    fields["rope_original_max_seq_len"] = int(fields["rope_original_max_seq_len"])
    return {"rope_scaling": "llama3", **fields}


def args_from_hf_config(cfg: dict, has_lm_head: bool, where: str = "config.json") -> ModelArgs:
    """ModelArgs of an HF Llama config; UserError for anything triaxis does not compute the same
    way (it would import without error and then give different outputs)."""
    model_type = cfg.get("model_type", "llama")
    moe.refuse_unsupported_moe(model_type, where)
    if model_type not in _MODEL_TYPES:
        raise UserError(
            f"{where}: model_type={model_type!r} is not supported; import-hf reads "
            f"Llama-architecture models (model_type {', '.join(map(repr, _MODEL_TYPES))})"
        )
    experts = {}
    if model_type == "mixtral":
        experts = moe.mixtral_fields(cfg, where)
    elif model_type == "qwen3_moe":
        experts = moe.qwen3_moe_fields(cfg, where)
    qwen3 = model_type in ("qwen3", "qwen3_moe")
    if qwen3 and cfg.get("use_sliding_window"):
        raise UserError(
            f"{where}: use_sliding_window=true is not supported (triaxis's attention is full "
            "causal); set it to false"
        )
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}: not a Llama config")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(
            f"{where}: hidden_act={act!r} is not supported; triaxis's MLP is SwiGLU "
            "(hidden_act 'silu')"
        )
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UserError(
                f"{where}: {key}=true is not supported; triaxis's Linear layers have no bias"
            )
    kind, theta, scaling = _rope_params(cfg)
    if kind not in (None, "llama3"):
        raise UserError(
            f"{where}: RoPE scaling type {kind!r} is not implemented (triaxis "
            "computes plain RoPE and Llama 3.1's 'llama3' scaling); importing would "
            "change the model's outputs"
        )
    rope = _llama3_fields(scaling, where) if kind == "llama3" else {}
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or 0
    if not head_dim and dim % n_heads:
        raise UserError(
            f"{where}: hidden_size={dim} is not divisible by num_attention_heads={n_heads} "
            "and no head_dim is given"
        )
    head_dim = head_dim or dim // n_heads
    if head_dim % 2:
        raise UserError(f"{where}: head_dim={head_dim} is odd; RoPE needs an even head size")
    if n_heads % n_kv_heads:
        raise UserError(
            f"{where}: num_key_value_heads={n_kv_heads} does not divide "
            f"num_attention_heads={n_heads}"
        )
    tied = bool(cfg.get("tie_word_embeddings", False))  # LlamaConfig's default: untied
    if not tied and not has_lm_head:
        # transformers would load this with a freshly initialized (random) head.
        raise UserError(
            f"{where}: tie_word_embeddings is false (or absent) but the checkpoint has no "
            "lm_head.weight, so transformers would load a random output head; set "
            '"tie_word_embeddings": true if the model ties its head to the embedding'
        )
    return ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(theta if theta is not None else 10000.0),  # transformers' default
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=tied,
        # Only a head size apart from dim / n_heads is recorded: Llama imports stay as they were.
        head_size=head_dim if dim % n_heads or head_dim != dim // n_heads else 0,
        qk_norm=qwen3,
        **rope,
        **experts,
    )


def hf_config_from_args(args: ModelArgs) -> dict:
    """A LlamaConfig dict (Qwen3Config with the per-head q/k norms; MixtralConfig or
    Qwen3MoeConfig for an MoE) that transformers 4.x and 5.x both read (legacy rope_theta
    spelling)."""
    if args.n_experts:
        moe.check_exportable(args)
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **(qwen3 if args.qk_norm else {}),
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.ffn_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": _hf_rope_scaling(args),
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
        # The token ids belong to the tokenizer, which a checkpoint does not record: unset rather
        # than transformers' defaults (1, 2), which are wrong for most tokenizers.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **({"use_sliding_window": False, "sliding_window": None} if args.qk_norm else {}),
        **(moe.moe_config(args) if args.n_experts else {}),
    }


def _hf_rope_scaling(args: ModelArgs) -> dict | None:
    if args.rope_scaling == "none":
        return None
    out = {"rope_type": args.rope_scaling}
    out.update({key: getattr(args, field) for key, field in _LLAMA3_KEYS.items()})
    return out


def model_overrides(args: ModelArgs) -> list[str]:
    """`--model.*` overrides that make `triaxis train` build exactly this shape."""
    tie = "true" if args.tie_embeddings else "false"
    out = [
        f"--model.dim={args.dim}",
        f"--model.n_layers={args.n_layers}",
        f"--model.n_heads={args.n_heads}",
        f"--model.n_kv_heads={args.n_kv_heads}",
        f"--model.ffn_dim={args.ffn_dim}",
        f"--model.vocab_size={args.vocab_size}",
        f"--model.max_seq_len={args.max_seq_len}",
        f"--model.rope_theta={args.rope_theta}",
        f"--model.norm_eps={args.norm_eps}",
        f"--model.tie_embeddings={tie}",
        f"--model.rope_scaling={args.rope_scaling}",
        f"--model.rope_scaling_factor={args.rope_scaling_factor}",
        f"--model.rope_low_freq_factor={args.rope_low_freq_factor}",
        f"--model.rope_high_freq_factor={args.rope_high_freq_factor}",
        f"--model.rope_original_max_seq_len={args.rope_original_max_seq_len}",
    ] + (
        [
            f"--model.n_experts={args.n_experts}",
            f"--model.moe_top_k={args.moe_top_k}",
            f"--model.moe_ffn_dim={args.moe_ffn_dim}",
            f"--model.moe_norm_topk={'true' if args.moe_norm_topk else 'false'}",
            f"--model.moe_first_dense={args.moe_first_dense}",
        ]
        if args.n_experts
        else []
    )
    if args.head_size:
        out.append(f"--model.head_dim={args.head_size}")
    if args.qk_norm:
        out.append("--model.qk_norm=true")
    return out
