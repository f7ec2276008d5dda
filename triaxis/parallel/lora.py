"""LoRA: low-rank adapters beside frozen Linear weights, applied from outside the model.

Each targeted nn.Linear keeps its weight (frozen) and its state-dict key, and gains two children,
`lora_a` (rank, in) and `lora_b` (out, rank), plus a forward hook that adds
`lora_b(lora_a(dropout(x))) * alpha / rank` to its output. A hook rather than a wrapper module:
the base keys stay `...wq.weight`, so a full checkpoint or an imported model loads as is, and
the tensor-parallel plan (which names the Linear) is untouched.

Applied in `parallelize` right after tensor parallelism (see its docstring): the adapters copy
the placement TP gave the base weight, and checkpointing, compile and FSDP then treat them as
any other parameter of the block.

Under TP (reasoned from y = x Wᵀ + x Aᵀ Bᵀ):
- column-wise base (W sharded on out, input replicated): A is replicated, so x Aᵀ is the same
  (batch, seq, rank) on every rank; B is sharded on out like W, so the adapter's output is
  sharded on the last dim exactly like the base output. No extra communication.
- row-wise base (W sharded on in, input sharded on the last dim): A is sharded on in like W, so
  x Aᵀ is a partial sum, reduce-scattered to sequence shards (rank-wide: tiny) like the base
  output; B is replicated and applied to each rank's sequence shard.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from triaxis.config import LoraConfig
from triaxis.errors import UserError
from triaxis.model.moe import moe_layers
from triaxis.parallel.targets import matches


def patterns(cfg: LoraConfig) -> list[str]:
    return [p.strip() for p in cfg.targets.split(",") if p.strip()]


def check_targets(cfg: LoraConfig, model: nn.Module, tp: int) -> None:
    """One line for a pattern that matches no Linear of the (full, meta-device) model, and for a
    target this layout cannot adapt."""
    pats = patterns(cfg)
    if not pats:
        raise UserError(
            "lora.targets is empty; name Linear modules, e.g. attention.wq,attention.wv"
        )
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    moe_blocks = [n for n, _ in moe_layers(model)]
    for p in pats:
        hit = [n for n in names if matches(n, [p])]
        if not hit:
            tails = sorted({n.split(".", 2)[-1] for n in names})
            raise UserError(
                f"lora.targets pattern {p!r} matches no Linear of the model; "
                f"use names such as {', '.join(tails)}"
            )
        if tp > 1 and "output" in hit:
            raise UserError(
                f"lora.targets pattern {p!r} adapts the LM head, which parallel.tp={tp} gathers "
                "or keeps vocabulary-sharded; drop it from lora.targets or set --parallel.tp=1"
            )
        in_moe = [n for n in hit if any(n.startswith(m + ".") for m in moe_blocks)]
        if tp > 1 and in_moe:
            raise UserError(
                f"lora.targets pattern {p!r} adapts {in_moe[0]}, a linear of an MoE block, "
                f"which parallel.tp={tp} replicates (adapters follow tp-sharded linears only); "
                "drop it from lora.targets or set --parallel.tp=1"
            )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Add adapters to the matching Linears of `model` (meta device or not, TP-sharded or not),
    freeze everything else; return the adapted names."""
    pats = patterns(cfg)
    adapted = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and matches(name, pats):
            _add_adapter(mod, cfg)
            adapted.append(name)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return adapted


def is_adapter(name: str) -> bool:
    return ".lora_a." in name or ".lora_b." in name or name.startswith(("lora_a.", "lora_b."))


def _add_adapter(linear: nn.Linear, cfg: LoraConfig) -> None:
    w = linear.weight
    dev, dtype = w.device, w.dtype
    # Built with the full shapes, then placed like the base weight (see the module docstring).
    linear.lora_a = nn.Linear(linear.in_features, cfg.rank, bias=False, device=dev, dtype=dtype)
    linear.lora_b = nn.Linear(cfg.rank, linear.out_features, bias=False, device=dev, dtype=dtype)
    linear.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
    linear.lora_scale = cfg.alpha / cfg.rank
    if hasattr(w, "device_mesh"):
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh, (placement,) = w.device_mesh, w.placements
        colwise = placement == Shard(0)
        assert colwise or placement == Shard(1), f"unexpected TP placement {placement}"
        a_place, b_place = (Replicate(), Shard(0)) if colwise else (Shard(1), Replicate())
        for sub, place in ((linear.lora_a, a_place), (linear.lora_b, b_place)):
            sub.weight = nn.Parameter(distribute_tensor(sub.weight.data, mesh, [place]))
        linear.lora_colwise = colwise
    linear.register_forward_hook(_adapter_hook)


def _adapter_hook(linear: nn.Linear, args, out):
    # `args` are the inputs after TP's input hook: a DTensor (replicated for a column-wise base,
    # sharded on the last dim for a row-wise one); `out` is the base output after TP's.
    h = linear.lora_a(linear.lora_dropout(args[0]))
    if hasattr(h, "placements"):
        from torch.distributed.tensor import Shard

        if linear.lora_colwise:
            delta = linear.lora_b(h).to_local()
        else:
            h = h.redistribute(placements=[Shard(1)])  # partial sums -> sequence shards
            # Sequence first: torch 2.11's DTensor cannot flatten (batch, sequence) for the
            # matmul while the sequence (dim 1) is sharded; (sequence, batch) it can.
            delta = linear.lora_b(h.transpose(0, 1)).to_local().transpose(0, 1)
    else:
        delta = linear.lora_b(h)
    return out + delta * linear.lora_scale


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A like nn.Linear's default (PEFT's too), B zero: training starts at the base model.
    Each A draws from its own generator seeded by (seed, name) into a full-size tensor, so
    every layout starts from the single-process adapters."""
    for name, param in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        if not is_adapter(name):
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        full = torch.zeros(param.shape, dtype=param.dtype, device=local.device)
        if ".lora_a." in name or name.startswith("lora_a."):
            gen = torch.Generator(device=full.device)
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)
