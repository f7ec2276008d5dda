"""A mixture-of-experts feed-forward block in single-device code.

A router scores every token against `n_experts` SwiGLU experts (softmax), keeps the top k and
sends the token to those experts; their outputs are summed, weighted by the kept scores
(renormalized over the k when `moe_norm_topk`, as Mixtral does). Optional shared experts see
every token (DeepSeek / Qwen-style). Balancing, both optional:
- the auxiliary loss (Switch Transformer): E * sum_e f_e * P_e, f_e the fraction of assignments
  that went to expert e, P_e the mean router probability of e; it enters the gradient through
  `_AttachAux` (the loss the loop reports stays the language-model loss; the aux loss is a
  metric of its own), so every loss path (fused head, tp, pp) trains with it unchanged;
- aux-free bias balancing (DeepSeek-V3): a per-expert bias added to the scores for the top-k
  choice only (the weights stay the plain scores); after each optimizer step
  `update_expert_bias` moves it by `moe_bias_update_rate` toward the under-loaded experts. The
  bias and the tokens counted since the last update are persistent buffers: a checkpoint carries
  the balancing state.

Capacity: dropless (`moe_capacity_factor` = 0), or each expert takes at most
ceil(factor * tokens * k / E) assignments of a batch, the rest dropped (their combine weight 0:
the token keeps its residual and the shared experts) and counted. Every count here stays on the
device: no host sync on the hot path (the capacity is known from the shape alone).

Expert compute: `expert_swiglu` is the one place the kernel is chosen (grouped matmul where torch
has it, a loop elsewhere). Expert parallelism replaces `dispatch`/`combine` from outside
(triaxis.parallel); nothing here knows about ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from triaxis.model.args import ModelArgs


class _AttachAux(torch.autograd.Function):
    """Identity on `out`; in backward, `aux` receives the gradient `scale` (d(scale * aux)), as if
    scale * aux had been added to the loss."""

    @staticmethod
    def forward(ctx, out, aux, scale: float):
        ctx.scale = scale
        ctx.aux_like = (aux.shape, aux.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        shape, dtype = ctx.aux_like
        grad_aux = torch.full(shape, ctx.scale, dtype=dtype, device=grad_out.device)
        return grad_out, grad_aux, None


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm for these operands: its CUDA kernel (sm90+) takes bf16 only; torch's
    CPU implementation any float (measured: bench/moe_experts.py). Untested on a GPU here."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


def _grouped_swiglu(x, ends, w1, w3, w2) -> torch.Tensor:
    h = F.silu(torch._grouped_mm(x, w1, offs=ends)) * torch._grouped_mm(x, w3, offs=ends)
    return torch._grouped_mm(h, w2, offs=ends)


_eager_grouped_swiglu = torch.compiler.disable(_grouped_swiglu)


def expert_swiglu(
    x: torch.Tensor, ends: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of each expert over its rows. x (M, D) sorted by expert, expert e's rows ending at
    ends[e] (int32, cumulative); w1, w3 (E, D, H), w2 (E, H, D) -> (M, D)."""
    if grouped_mm_supported(x.device, x.dtype):
        if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            # The op's fake-tensor rule (what torch.compile traces) admits bf16 only, though
            # the CPU kernel takes any float: run it eagerly, one graph break per MoE block.
            return _eager_grouped_swiglu(x, ends, w1, w3, w2)
        return _grouped_swiglu(x, ends, w1, w3, w2)
    # Elsewhere a loop over experts; reading the group ends is a host sync, on such devices only.
    out, start = [], 0
    for e, end in enumerate(ends.tolist()):
        xe = x[start:end]
        out.append((F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
        start = end
    return torch.cat(out)


class Experts(nn.Module):
    """n_experts SwiGLU MLPs as three stacked weights, so a grouped matmul runs them at once and
    expert parallelism shards them on dim 0."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) as the kernels take them (parallelism may swap in local tensors)."""
        return self.w1, self.w3, self.w2

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return expert_swiglu(x, ends, *self.weights())

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """x (E, C, D): C rows per expert (zero rows for unused slots) -> (E, C, D)."""
        w1, w3, w2 = self.weights()
        return torch.bmm(F.silu(torch.bmm(x, w1)) * torch.bmm(x, w3), w2)


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.moe_top_k
        self.norm_topk = args.moe_norm_topk
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)
        # Aux-free balancing state (zeros and unused without moe_bias_update_rate).
        self.register_buffer("expert_bias", torch.zeros(args.n_experts))
        self.register_buffer("tokens_since_update", torch.zeros(args.n_experts))
        # Without aux-free balancing nothing reads (or all-reduces and resets) the counts: kept,
        # each data-parallel rank's would be its own, and checkpoints would differ by layout.
        self.counts_tokens = args.moe_bias_update_rate > 0

    def forward(self, x: torch.Tensor):
        """x (N, D) -> probabilities (N, E) fp32, chosen experts (N, k), their weights (N, k)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        # The bias steers the choice only; the weights stay the router's probabilities.
        chosen = torch.topk(probs + self.expert_bias, self.top_k, dim=-1).indices  # (N, k)
        weights = probs.gather(-1, chosen)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, chosen, weights


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts = args.n_experts
        self.top_k = args.moe_top_k
        self.capacity_factor = args.moe_capacity_factor
        self.aux_loss_coef = args.moe_aux_loss_coef
        self.aux_scale = 1.0
        """Multiplies the aux loss's gradient: 1 / micro-batches, set by set_aux_scale, so a
        step's aux term does not grow with gradient accumulation."""
        self.router = Router(args)
        self.experts = Experts(args.n_experts, args.dim, args.moe_ffn_dim)
        self.shared = None
        if args.n_shared_experts:
            from triaxis.model.llama import FeedForward  # llama imports this module

            self.shared = FeedForward(args.dim, args.n_shared_experts * args.moe_ffn_dim)
        # The last forward's balance figures, on the device; and their sum over the training
        # forwards since the last log step (STAT_NAMES order), read there only (moe_record).
        self.stats: dict[str, torch.Tensor] = {}
        self.stats_sum: torch.Tensor | None = None
        self.stats_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        probs, chosen, weights = self.router(flat)
        # Tokens per expert by scatter_add (bincount's output size would be a host sync).
        ones = torch.ones(chosen.numel(), dtype=torch.long, device=x.device)
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, chosen.flatten(), ones
        )  # (E,) exact integers
        if self.training and self.router.counts_tokens:
            # Activation checkpointing runs this forward again in backward, so a block's counts
            # and figures may be added twice; always all of a block's forwards, so the bias
            # update (a sign per expert) and the figures (means over forwards) stay the same.
            self.router.tokens_since_update += counts.detach()
        out, dropped = self.dispatch_compute_combine(flat, chosen, weights, counts)
        if self.shared is not None:
            out = out + self.shared(flat)
        aux = self.n_experts * (counts / chosen.numel() * probs.mean(0)).sum()  # fp32
        if self.training and self.aux_loss_coef > 0 and torch.is_grad_enabled():
            out = _AttachAux.apply(out, aux, self.aux_loss_coef * self.aux_scale)
        self.stats = {
            "aux_loss": aux.detach(),
            "load_max": counts.max().float(),
            "load_mean": counts.float().mean(),
            "dropped": dropped,
        }
        if self.training:
            # dropped: as a share of the assignments
            load = counts.float()
            now = torch.stack([aux.detach(), load.max(), load.mean(), dropped / chosen.numel()])
            self.stats_sum = now if self.stats_sum is None else self.stats_sum + now
            self.stats_forwards += 1
        return out.view(B, T, D)

    def capacity(self, n_tokens: int) -> int:
        """Assignments one expert takes from a batch of n_tokens (0: dropless)."""
        if self.capacity_factor <= 0:
            return 0
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def dispatch_compute_combine(self, flat, chosen, weights, counts):
        """Route each token's k assignments to the experts and sum their weighted outputs back;
        -> (N, D) and the number of dropped assignments (a device tensor)."""
        N, D = flat.shape
        expert = chosen.flatten()  # (N*k,) assignment -> expert
        token = torch.arange(N, device=flat.device).repeat_interleave(self.top_k)
        order = torch.argsort(expert, stable=True)  # assignments grouped by expert, token order
        ends = counts.cumsum(0).to(torch.int32)
        sorted_expert = expert[order]
        # Rank of each sorted assignment within its expert's group.
        starts = ends - counts
        rank = torch.arange(order.numel(), device=flat.device) - starts[sorted_expert]
        capacity = self.capacity(N)
        w = weights.flatten()[order].to(flat.dtype)
        if capacity:
            keep = rank < capacity
            slot = torch.where(keep, sorted_expert * capacity + rank, self.n_experts * capacity)
            # One spare row takes every dropped assignment; it is computed and discarded.
            buf = flat.new_zeros(self.n_experts * capacity + 1, D)
            buf = buf.index_copy(0, slot, flat[token[order]])
            y = self.experts.padded(buf[:-1].view(self.n_experts, capacity, D)).reshape(-1, D)
            y = torch.cat([y, y.new_zeros(1, D)])[slot] * (w * keep)[:, None]
            dropped = (~keep).sum()
        else:
            y = self.experts(flat[token[order]], ends) * w[:, None]
            dropped = torch.zeros((), dtype=torch.long, device=flat.device)
        return flat.new_zeros(N, D).index_add(0, token[order], y), dropped


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


STAT_NAMES = ("moe_aux_loss", "moe_load_max", "moe_load_mean", "moe_dropped")
"""Per MoE block, in the metrics as NAME/LAYER: the aux loss, the most and the mean tokens
routed to one expert (of a micro-batch), the share of assignments dropped by the capacity."""


def moe_record(
    model: nn.Module, reduce, layer_ids: list[int] | None = None, device=None
) -> dict[str, float]:
    """The MoE figures of a log step: each block's mean over its training forwards since the
    last call, then `reduce` (the mean over data-parallel ranks, on the device); one host read.
    Empty for a dense model. `layer_ids` (pipelines): every MoE block's index in the full
    model; this rank fills the rows of the blocks it holds (zeros elsewhere, made on `device`)
    and `reduce` must also sum over the pipeline ranks, which all call this."""
    layers = [(_layer_id(name), m) for name, m in moe_layers(model) if m.stats_forwards]
    if layer_ids is None:
        if not layers:
            return {}
        ids = [i for i, _ in layers]
        table = torch.stack([m.stats_sum.float() / m.stats_forwards for _, m in layers])
    else:
        if not layer_ids:
            return {}
        ids = layer_ids
        table = torch.zeros(len(ids), len(STAT_NAMES), device=device)  # (L, 4)
        for i, m in layers:
            table[ids.index(i)] = m.stats_sum.float() / m.stats_forwards
    for _, m in layers:
        m.stats_sum, m.stats_forwards = None, 0
    values = reduce(table).tolist()
    record = {}
    for layer, row in zip(ids, values):
        record.update({f"{stat}/{layer}": value for stat, value in zip(STAT_NAMES, row)})
    record["moe_aux_loss"] = sum(row[0] for row in values) / len(values)
    return record


def _layer_id(name: str) -> int:
    return int(name.split("layers.")[-1].split(".")[0])


def set_aux_scale(model: nn.Module, scale: float) -> None:
    """Scale of every MoE layer's aux-loss gradient (1 / gradient-accumulation micro-batches)."""
    for _, m in moe_layers(model):
        m.aux_scale = scale


@torch.no_grad()
def update_expert_bias(
    model: nn.Module, rate: float, group=None, skip: torch.Tensor | None = None
) -> None:
    """Aux-free balancing, once per optimizer step: each expert's bias moves by `rate` toward
    balance (up when it took fewer than the mean tokens since the last update, down when more),
    then the counts restart. `group`: the data-parallel ranks, whose counts are summed first so
    every replica of the router keeps the same bias. `skip`: the numerics guard's device flag
    (1 = this step's update is skipped): the bias stays too, and the bad batch's counts go."""
    layers = moe_layers(model)
    if not layers or rate <= 0:
        return
    counts = torch.stack([m.router.tokens_since_update for _, m in layers])  # (layers, E)
    if group is not None:
        import torch.distributed as dist

        # async_op + wait: on NCCL the wait orders the streams, it does not block the host.
        dist.all_reduce(counts, group=group, async_op=True).wait()
    for (_, m), c in zip(layers, counts):
        move = rate * torch.sign(c.mean() - c)
        m.router.expert_bias += move if skip is None else move * (1 - skip)
        m.router.tokens_since_update.zero_()
