"""A Llama-style decoder in single-device code.

RMSNorm, rotary position embeddings, grouped-query attention (triaxis.model.attention: causal
over the window, or within each packed document), a SwiGLU MLP, optional tied embeddings.
Nothing here knows about parallelism: tensor parallelism shards the Linear layers from outside
(triaxis.parallel.parallelize), so every reshape infers the local head count with -1 instead of
trusting n_heads.

The model is built on the meta device, then materialized (`to_empty`) and filled by
`init_weights`, so a sharded layout never holds the full model on one rank.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

# The shape and its counts live in args.py (no torch there, for the planner); re-exported here.
from triaxis.model.args import ModelArgs, block_param_count, flops_per_token, param_counts  # noqa: F401
from triaxis.model.attention import attend, document_mask, document_positions
from triaxis.model.loss import chunked_cross_entropy
from triaxis.model.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 for stability under bf16 autocast, return in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_tables(
    head_dim: int, seq_len: int, theta: float, device=None, scaling: ModelArgs | None = None
) -> torch.Tensor:
    """cos/sin tables, shape (seq_len, head_dim // 2, 2); `scaling`: the args whose
    rope_scaling fields rescale the frequencies (None or rope_scaling "none": plain RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is not None and scaling.rope_scaling == "llama3":
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def model_rope_tables(args: ModelArgs, device=None) -> torch.Tensor:
    return rope_tables(args.head_dim, args.max_seq_len, args.rope_theta, device, scaling=args)


def llama3_frequencies(inv_freq: torch.Tensor, a: ModelArgs) -> torch.Tensor:
    """Llama 3.1's context extension. A rotation that turns more than high_freq_factor times over
    the original context keeps its frequency (it already encodes position locally); one that
    turns fewer than low_freq_factor times is slowed by `factor` (so the longer context stays
    inside the angles seen in training); between the two, the frequency blends linearly in the
    number of turns."""
    wavelength = 2 * math.pi / inv_freq
    turns = a.rope_original_max_seq_len / wavelength  # turns over the original context
    # 0 at low_freq_factor turns (fully scaled) .. 1 at high_freq_factor turns (unscaled).
    blend = (
        (turns - a.rope_low_freq_factor) / (a.rope_high_freq_factor - a.rope_low_freq_factor)
    ).clamp(0.0, 1.0)
    return inv_freq * (blend + (1 - blend) / a.rope_scaling_factor)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x: (B, T, H, head_dim) by the angles in table[:T], or,
    with per-token positions, by a table already gathered at them: (B, T, head_dim / 2, 2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    if table.ndim == 3:
        table = table[: x.shape[1]]  # positions 0..T-1, shared by every row
    cos = table[..., None, :, 0]  # (T, 1, hd/2) or (B, T, 1, hd/2)
    sin = table[..., None, :, 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.kv_repeat = args.n_heads // args.n_kv_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # Qwen3: each head of q and k normalized (one weight over head_dim, shared by the heads).
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask=None) -> torch.Tensor:
        """`mask`: None (causal over the window) or a document mask (triaxis.model.attention)."""
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, nh, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        # Grouped-query attention: each KV head serves n_heads / n_kv_heads query heads.
        y = attend(q, k, v, mask, gqa=self.kv_repeat > 1)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module = (
            MoE(args) if args.is_moe_layer(layer) else FeedForward(args.dim, args.ffn_dim)
        )

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask=None) -> torch.Tensor:
        # Positional: tensor parallelism's input plan for `attention` names each argument.
        h = x + self.attention(self.attention_norm(x), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by the global layer index keeps checkpoint keys stable when a
        # pipeline stage holds only some of the blocks.
        self.layers = nn.ModuleDict({str(i): Block(args, i) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Context parallelism's hook (triaxis.parallel.context.apply_cp); None: one rank
        # holds the whole sequence.
        self.context_parallel = None
        # Not persistent: recomputed by init_weights, never part of a checkpoint.
        self.register_buffer("rope", model_rope_tables(args), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_chunk: int = 0,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). Missing parts (pipeline stages) pass through.
        With targets (B, T) and loss_chunk > 0: the mean next-token loss instead, the head and
        the loss fused a chunk of tokens at a time (triaxis.model.loss): no full logits.
        doc_ids (B, T) (triaxis.model.attention.document_ids): attend within each document
        only, RoPE positions restarting at each; None = one causal sequence."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        rope, mask = self.rope, None
        if self.context_parallel is not None:  # tokens: this rank's shard of the sequence
            rope, mask = self.context_parallel.rope_and_mask(self.rope, doc_ids, tokens)
        elif doc_ids is not None:
            rope = self.rope[document_positions(doc_ids)]  # (B, T, hd/2, 2)
            mask = document_mask(doc_ids)
        for layer in self.layers.values():
            h = layer(h, rope, mask)
        h = self.norm(h) if self.norm is not None else h
        if targets is not None and loss_chunk > 0:
            return chunked_cross_entropy(
                h.flatten(0, 1), self.output.weight, targets.flatten(), loss_chunk
            )
        return self.output(h) if self.output is not None else h

    def materialize(self, device: torch.device | str) -> None:
        """Allocate the meta-device parameters on `device` (uninitialized; see init_weights).

        Plain `to_empty` re-registers each parameter separately and so unties the embedding and
        the head; swapping storage in place keeps the one shared Parameter object.
        """
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            self.to_empty(device=device)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
        if self.args.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            assert self.output.weight is self.tok_embeddings.weight, "tied weights came apart"

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Fill every parameter and buffer; call after `materialize` from the meta device.

        Each parameter draws from its own generator, seeded by (seed, its name), into a full-size
        tensor; a sharded parameter (DTensor) then keeps its own slice. So every layout, and a
        partial pipeline stage, starts from exactly the weights of the single-process model.
        """
        self.rope.copy_(model_rope_tables(self.args, device=self.rope.device))
        for module in self.modules():
            if isinstance(module, MoE):  # the router's balancing state starts at zero
                module.router.expert_bias.zero_()
                module.router.tokens_since_update.zero_()
        for name, param in self.named_parameters():
            name = clean_name(name)
            full = torch.empty(param.shape, dtype=param.dtype, device=_local(param).device)
            gen = torch.Generator(device=full.device)
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            self._init_rule(name)(full, gen)
            _copy_into(param, full)

    def _init_rule(self, name: str):
        """The initializer of one parameter, by name (the single-device definition)."""
        if name.endswith("norm.weight"):
            return lambda t, g: t.fill_(1.0)
        if name.startswith("tok_embeddings"):
            std = 0.02 if self.args.tie_embeddings else 1.0
            return lambda t, g: nn.init.normal_(t, std=std, generator=g)
        if name.startswith("output"):
            std = self.args.dim**-0.5
        elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
            # Depth-scaled residual projections keep the residual stream's variance flat.
            std = 0.02 / math.sqrt(2 * (int(name.split(".")[1]) + 1))
        else:
            std = 0.02
        return lambda t, g: nn.init.trunc_normal_(t, std=std, a=-3 * std, b=3 * std, generator=g)


def clean_name(name: str) -> str:
    """A parameter's name without the wrappers parallelism adds (checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    if hasattr(param, "device_mesh"):  # a DTensor: keep this rank's slice only, no communication
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)
