"""Hugging Face mixture-of-experts layouts <-> triaxis's MoE block: names, expert slices, config.

Two families map exactly (`family_of`):
- Mixtral (model_type 'mixtral'): router softmax over all experts, top k, renormalized over the
  k (triaxis: `moe_norm_topk`), dropless, no shared experts, every block MoE. Experts on disk:
  `block_sparse_moe.experts.{j}.w1/w3/w2.weight`, router `block_sparse_moe.gate.weight`.
- Qwen3-MoE (model_type 'qwen3_moe'): the same router with `norm_topk_prob` choosing the
  renormalization, per-head q/k RMSNorm in attention (triaxis: `qk_norm`), a head size of its
  own (`head_dim`), and optionally dense first blocks (`mlp_only_layers` = 0..k-1: triaxis's
  `moe_first_dense`). Experts: `mlp.experts.{j}.gate_proj/up_proj/down_proj.weight`, router
  `mlp.gate.weight`.
On disk (the Hub's format, and what transformers 5 writes back) every expert is three Linear
weights of shape (out, in); triaxis stacks the experts into (E, in, out) tensors, so expert j of
`experts.w1` is the transpose of HF's gate matrix of expert j.

Qwen2-MoE is refused in one line (a sigmoid-gated shared expert and q/k/v biases, which triaxis's
block lacks), as is any Qwen3-MoE setting triaxis computes otherwise (decoder_sparse_step > 1,
dense blocks other than the first k, sliding windows): importing them would run another model.
"""

from __future__ import annotations

import re

import torch

from triaxis.errors import UserError

# Per family: HF expert matrix -> triaxis stacked parameter (after `layers.{i}.feed_forward.`)
_EXPERT_MATRICES = {
    "mixtral": {"w1": "w1", "w3": "w3", "w2": "w2"},
    "qwen3_moe": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
}
_BLOCK = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}
_HF_EXPERT = re.compile(
    r"model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\."
    r"(w[123]|gate_proj|up_proj|down_proj)\.weight"
)
_HF_GATE = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight")
_TX_EXPERTS = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])")
_TX_GATE = re.compile(r"layers\.(\d+)\.feed_forward\.router\.gate\.weight")
STACKED = ("feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3")
"""Triaxis parameters that stack every expert's matrix of a layer (dim 0: the expert)."""
ROUTER_BUFFERS = ("router.expert_bias", "router.tokens_since_update")
"""Triaxis-only balancing state: not in an HF checkpoint, zero after import, never exported."""

_REFUSED = {
    "qwen2_moe": "its shared expert is scaled by a sigmoid gate (shared_expert_gate) and q/k/v "
    "carry biases, which triaxis's block lacks",
}


def family_of(args) -> str:
    """The HF layout a triaxis MoE model exports to: Qwen3-MoE's when its attention has the
    per-head q/k norms (only Qwen3 has them), else Mixtral's."""
    return "qwen3_moe" if getattr(args, "qk_norm", False) else "mixtral"


def refuse_unsupported_moe(model_type: str, where: str) -> None:
    if model_type in _REFUSED:
        raise UserError(
            f"{where}: model_type={model_type!r} is not supported: {_REFUSED[model_type]}; "
            "importing it would change the model's outputs (Mixtral and Qwen3-MoE import "
            "exactly)"
        )


def hf_moe_target(name: str) -> tuple[str, int | None] | None:
    """(triaxis name, expert index or None) of an HF MoE tensor; None if not one."""
    m = _HF_EXPERT.fullmatch(name)
    if m:
        layer, block, expert, mat = m.groups()
        family = "mixtral" if block == "block_sparse_moe" else "qwen3_moe"
        matrix = _EXPERT_MATRICES[family].get(mat)
        if matrix is not None:
            return f"layers.{layer}.feed_forward.experts.{matrix}", int(expert)
    m = _HF_GATE.fullmatch(name)
    if m:
        return f"layers.{m.group(1)}.feed_forward.router.gate.weight", None
    return None


def hf_names_of(name: str, args) -> list[tuple[str, int | None]] | None:
    """The HF tensors (name, expert index or None) one triaxis MoE parameter becomes in its
    family's layout; None if the parameter is not an MoE one."""
    family = family_of(args)
    block = _BLOCK[family]
    m = _TX_EXPERTS.fullmatch(name)
    if m:
        layer, mat = m.groups()
        hf_mat = {v: k for k, v in _EXPERT_MATRICES[family].items()}[mat]
        prefix = f"model.layers.{layer}.{block}.experts"
        return [(f"{prefix}.{j}.{hf_mat}.weight", j) for j in range(args.n_experts)]
    m = _TX_GATE.fullmatch(name)
    if m:
        return [(f"model.layers.{m.group(1)}.{block}.gate.weight", None)]
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


def qwen3_moe_fields(cfg: dict, where: str) -> dict:
    """ModelArgs MoE fields of a Qwen3-MoE config; UserError for what triaxis computes
    otherwise."""
    # transformers 4 writes num_experts, 5 num_local_experts (it reads either)
    key = "num_experts" if "num_experts" in cfg else "num_local_experts"
    n_experts = _int(cfg, key, where)
    top_k = _int(cfg, "num_experts_per_tok", where)
    if top_k > n_experts:
        raise UserError(f"{where}: num_experts_per_tok={top_k} exceeds {key}={n_experts}")
    step = cfg.get("decoder_sparse_step", 1)
    if step != 1:
        raise UserError(
            f"{where}: decoder_sparse_step={step} is not supported (triaxis makes every block "
            "after the first model.moe_first_dense an MoE block); it must be 1"
        )
    dense = sorted(cfg.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise UserError(
            f"{where}: mlp_only_layers={dense} is not supported: triaxis keeps only the FIRST "
            "k blocks dense (model.moe_first_dense), so it must be [0, 1, ..., k-1] or []"
        )
    return {
        "n_experts": n_experts,
        "moe_top_k": top_k,
        "moe_ffn_dim": _int(cfg, "moe_intermediate_size", where),
        "moe_norm_topk": bool(cfg.get("norm_topk_prob", False)),
        "moe_first_dense": len(dense),
    }


def check_exportable(args) -> None:
    """Refuse an MoE shape its HF family cannot express (nothing written yet)."""
    family, problems = family_of(args), []
    name = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE"}[family]
    if args.n_shared_experts:
        problems.append(f"model.n_shared_experts={args.n_shared_experts} ({name} has none)")
    if args.moe_first_dense and family == "mixtral":
        problems.append(f"model.moe_first_dense={args.moe_first_dense} (Mixtral: no dense block)")
    if not args.moe_norm_topk and family == "mixtral":
        problems.append("model.moe_norm_topk=false (Mixtral renormalizes the top-k weights)")
    if args.moe_capacity_factor:
        factor = args.moe_capacity_factor
        problems.append(f"model.moe_capacity_factor={factor} ({name} is dropless)")
    if args.moe_bias_update_rate:
        problems.append(
            f"model.moe_bias_update_rate={args.moe_bias_update_rate} (the learned routing bias "
            f"changes which experts a token picks; {name}'s router has none)"
        )
    if problems:
        raise UserError(
            f"export-hf writes this MoE model in {name}'s layout, which cannot express "
            f"{'; '.join(problems)}: nothing was written"
        )


def moe_config(args) -> dict:
    """The MoE keys of config.json in the model's family (the rest as for Llama/Qwen3)."""
    if family_of(args) == "qwen3_moe":
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_experts": args.n_experts,
            "num_experts_per_tok": args.moe_top_k,
            "moe_intermediate_size": args.moe_ffn_dim,
            "norm_topk_prob": args.moe_norm_topk,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(args.moe_first_dense)),
            "router_aux_loss_coef": args.moe_aux_loss_coef,
            "output_router_logits": False,
            "use_sliding_window": False,
            "sliding_window": None,
        }
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
