"""FP8 training: swap the transformer blocks' linears for torchao's Float8Linear, from outside.

Applied first in parallelize's fixed order (as torchtitan's model converters are): tensor
parallel, checkpointing, compile and FSDP then see Float8Linear modules whose weights are
still plain high-precision parameters, so they shard, wrap and checkpoint them as usual. The
weights, gradients, optimizer state and checkpoints stay fp32; only each GEMM's operands are
cast to float8 (e4m3 forward, e5m2 gradients) with dynamic scales, per tensor or per row.

What is converted (`float8_targets`): the linears inside `layers.*` (attention wq/wk/wv/wo,
feed-forward w1/w2/w3) whose in and out features are both >= train.float8_min_dim and
divisible by 16 (float8 GEMM kernels tile by 16), and not an MoE router (its top-k choice is
sensitive). An MoE block's routed experts are grouped weights, not Linears: they stay high
precision (attention and shared experts convert). Never the embedding or the output head:
their gradients are sparse/sensitive and torchtitan keeps them high precision too. The size
filter skips GEMMs too small to gain: the casts (a read of the operand and a write of half of
it, plus an amax reduction) cost more than the halved GEMM time below about 1k x 1k.
"""

from __future__ import annotations

import torch
from torch import nn

from triaxis.errors import UserError
from triaxis.parallel.float8_filter import eligible_dims

TORCHAO_EXTRA = "pip install 'triaxis[float8]' (torchao)"


def float8_targets(model: nn.Module, min_dim: int) -> list[str]:
    """Fully qualified names of the linears the conversion swaps, in module order."""
    return [name for name, m in model.named_modules() if _eligible(name, m, min_dim)]


def _eligible(fqn: str, module: nn.Module, min_dim: int) -> bool:
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
        return False
    if ".router." in fqn or fqn.endswith(".router"):
        # An MoE router's logits pick the experts: float8 rounding would flip its choices.
        return False
    return eligible_dims(module.in_features, module.out_features, min_dim)


def converted_flops_per_token(model_args, min_dim: int) -> float:
    """Training FLOPs per token that run in the converted (FP8) GEMMs: 6 x in x out of each
    linear the conversion swaps (each runs once per token: attention projections, dense and
    shared-expert MLPs; routed experts are not Linears and stay high precision)."""
    from triaxis.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_args)
    linears = dict(model.named_modules())
    return 6.0 * sum(
        linears[n].in_features * linears[n].out_features for n in float8_targets(model, min_dim)
    )


def float8_all_gather(recipe: str, device: torch.device, dp_shard: int) -> bool:
    """The one decision on FSDP's float8 all-gather (weights travel as float8: half the
    bytes). Only tensorwise scaling supports it (one scale per weight, computed before the
    gather); only NCCL carries float8 (gloo refuses the dtype: "Invalid scalar type"); and only
    a sharded weight is gathered at all."""
    return recipe == "tensorwise" and device.type == "cuda" and dp_shard > 1


def convert_float8(
    model: nn.Module, recipe: str, min_dim: int, fsdp_float8_all_gather: bool
) -> list[str]:
    """Swap the eligible linears in place; returns their names (empty: nothing matched)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError(f"train.float8={recipe!r} needs torchao; {TORCHAO_EXTRA}") from None
    targets = float8_targets(model, min_dim)
    if not targets:
        raise UserError(
            f"train.float8={recipe!r} converts no linear: none has both in and out features "
            f">= train.float8_min_dim={min_dim} (and divisible by 16); lower "
            "--train.float8_min_dim or set --train.float8=off"
        )
    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_float8_all_gather)
    else:
        config = Float8LinearConfig.from_recipe_name(recipe)
    wanted = set(targets)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in wanted)
    return targets


def float8_step_hook(recipe: str, device: torch.device, dp_shard: int):
    """What runs after each optimizer step, or None: with the float8 all-gather, torchao's
    precompute of the weights' scales (one amax reduction for all of them instead of one per
    weight inside each all-gather)."""
    if not float8_all_gather(recipe, device, dp_shard):
        return None
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    return precompute_float8_dynamic_scale_for_fsdp
