"""Hugging Face mixture-of-experts layouts <-> triaxis's MoE block: names, expert slices, config.

Mixtral (model_type 'mixtral') maps exactly: its router is softmax over all experts, top k,
renormalized over the k (triaxis: `moe_norm_topk`), dropless, no shared experts. On disk (the
Hub's format, and what transformers 5 writes back) every expert is three Linear weights,
`block_sparse_moe.experts.{j}.w1/w3/w2.weight` of shape (out, in); triaxis stacks the experts
into (E, in, out) tensors, so expert j of `experts.w1` is the transpose of HF's w1 of expert j.

Qwen3-MoE and Qwen2-MoE are refused in one line: Qwen3's attention normalizes q and k per head
(q_norm / k_norm), Qwen2-MoE gates its shared expert with a sigmoid and biases q/k/v, none of
which triaxis's block computes; importing them would run a different model.
"""

from __future__ import annotations

import re

import torch

from triaxis.errors import UserError

# HF expert matrix -> triaxis stacked parameter suffix (after `layers.{i}.feed_forward.`)
_EXPERT_MATRICES = {"w1": "experts.w1", "w3": "experts.w3", "w2": "experts.w2"}
_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_HF_GATE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")
_TX_EXPERTS = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])")
_TX_GATE = re.compile(r"layers\.(\d+)\.feed_forward\.router\.gate\.weight")
STACKED = ("feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3")
"""Triaxis parameters that stack every expert's matrix of a layer (dim 0: the expert)."""
ROUTER_BUFFERS = ("router.expert_bias", "router.tokens_since_update")
"""Triaxis-only balancing state: not in an HF checkpoint, zero after import, never exported."""

_REFUSED = {
    "qwen3_moe": "its attention applies q_norm/k_norm (a per-head RMSNorm on q and k), which "
    "triaxis's attention lacks",
    "qwen2_moe": "its shared expert is scaled by a sigmoid gate (shared_expert_gate) and q/k/v "
    "carry biases, which triaxis's block lacks",
}


def refuse_unsupported_moe(model_type: str, where: str) -> None:
    if model_type in _REFUSED:
        raise UserError(
            f"{where}: model_type={model_type!r} is not supported: {_REFUSED[model_type]}; "
            "importing it would change the model's outputs (Mixtral imports exactly)"
        )


def hf_moe_target(name: str) -> tuple[str, int | None] | None:
    """(triaxis name, expert index or None) of an HF Mixtral MoE tensor; None if not one."""
    m = _HF_EXPERT.fullmatch(name)
    if m:
        layer, expert, mat = m.groups()
        return f"layers.{layer}.feed_forward.{_EXPERT_MATRICES[mat]}", int(expert)
    m = _HF_GATE.fullmatch(name)
    if m:
        return f"layers.{m.group(1)}.feed_forward.router.gate.weight", None
    return None


def hf_names_of(name: str, n_experts: int) -> list[tuple[str, int | None]] | None:
    """The HF tensors (name, expert index or None) one triaxis MoE parameter becomes; None if
    the parameter is not an MoE one."""
    m = _TX_EXPERTS.fullmatch(name)
    if m:
        layer, mat = m.groups()
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        return [(f"{prefix}.{j}.{mat}.weight", j) for j in range(n_experts)]
    m = _TX_GATE.fullmatch(name)
    if m:
        return [(f"model.layers.{m.group(1)}.block_sparse_moe.gate.weight", None)]
    return None


def expert_to_hf(stacked: torch.Tensor, j: int) -> torch.Tensor:
    return stacked[j].t().contiguous()


def _int(cfg: dict, key: str, where: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: {key}={value!r} must be a whole number >= 1 for an MoE model")
    return value


def mixtral_fields(cfg: dict, where: str) -> dict:
    """ModelArgs MoE fields of a Mixtral config; UserError for what triaxis computes otherwise."""
    n_experts = _int(cfg, "num_local_experts", where)
    top_k = _int(cfg, "num_experts_per_tok", where)
    if top_k > n_experts:
        raise UserError(
            f"{where}: num_experts_per_tok={top_k} exceeds num_local_experts={n_experts}"
        )
    jitter = cfg.get("router_jitter_noise") or 0.0
    if jitter:
        raise UserError(
            f"{where}: router_jitter_noise={jitter} is not supported (triaxis's router adds no "
            "noise); set it to 0.0"
        )
    if cfg.get("sliding_window") is not None:
        raise UserError(
            f"{where}: sliding_window={cfg['sliding_window']} is not supported (triaxis's "
            "attention is full causal); set it to null"
        )
    return {
        "n_experts": n_experts,
        "moe_top_k": top_k,
        "moe_ffn_dim": cfg["intermediate_size"],
        "moe_norm_topk": True,  # Mixtral always renormalizes the kept k weights
    }


def check_exportable(args) -> None:
    """Refuse an MoE shape that Mixtral's layout cannot express (nothing written yet)."""
    problems = []
    if args.n_shared_experts:
        problems.append(f"model.n_shared_experts={args.n_shared_experts} (Mixtral has none)")
    if args.moe_first_dense:
        problems.append(f"model.moe_first_dense={args.moe_first_dense} (Mixtral: no dense block)")
    if not args.moe_norm_topk:
        problems.append("model.moe_norm_topk=false (Mixtral renormalizes the top-k weights)")
    if args.moe_capacity_factor:
        factor = args.moe_capacity_factor
        problems.append(f"model.moe_capacity_factor={factor} (Mixtral is dropless)")
    if args.moe_bias_update_rate:
        problems.append(
            f"model.moe_bias_update_rate={args.moe_bias_update_rate} (the learned routing bias "
            "changes which experts a token picks; Mixtral's router has none)"
        )
    if problems:
        raise UserError(
            "export-hf writes MoE models in Mixtral's layout, which cannot express "
            f"{'; '.join(problems)}: nothing was written"
        )


def mixtral_config(args) -> dict:
    """The Mixtral-specific keys of config.json (the rest as for Llama)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": args.n_experts,
        "num_experts_per_tok": args.moe_top_k,
        "intermediate_size": args.moe_ffn_dim,  # every block is MoE: ffn_dim is unused
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": args.moe_aux_loss_coef,
        "output_router_logits": False,
        "sliding_window": None,
    }
