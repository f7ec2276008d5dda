"""A candidate layout, the training runtimes the planner can model, and the enumeration."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from triaxis.plan.shape import ModelShape

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2")
AC_POLICIES = ("none", "selective", "full")


@dataclass(frozen=True)
class Runtime:
    """How a training system executes a layout: what it saves for backward, what it overlaps.

    `triaxis` is this repository (FSDP2 + DTensor TP with sequence parallelism, SDPA flash
    attention, eager RMSNorm in fp32). The other two describe the systems of the published rows.
    """

    name: str
    fsdp: bool
    """Parameters, gradients and optimizer states sharded over dp_shard (FSDP2 / MiCS / ZeRO-3).
    False: Megatron-LM 2021 -- fp16 weights, fp32 master and Adam replicated over data
    parallel."""
    flash_attention: bool
    """Fused attention: no s x s scores in memory or traffic (the 5as/h term drops)."""
    sequence_parallel: bool
    """TP shards the norm / dropout activations on the sequence (all-gather + reduce-scatter
    instead of all-reduce: the same traffic)."""
    fused_qkv: bool
    """q, k, v projections are one GEMM."""
    eager_fp32_kernels: bool = False
    """Unfused RMSNorm and rotary computed in fp32 (triaxis without compile): each norm keeps
    an fp32 input copy and its fp32 normalized output, rotary fp32 copies of q and k, and the
    loss an fp32 copy of the logits, log-softmax and its gradient."""
    sp_saves_gathered_inputs: bool = False
    """Under SP, the all-gathered attention / MLP inputs are what the projections save (DTensor
    TP); Megatron-style SP saves the sharded input and gathers it again in backward."""
    dp_overlap: bool = True
    """The data-parallel gradient all-reduce overlaps the backward pass."""
    grad_reduce_bytes: int = 4
    """Bytes per gradient element in reduce-scatter / all-reduce (fp32 in triaxis)."""
    gather_bytes: int = 2
    """Bytes per parameter element in FSDP all-gathers (bf16 compute copies)."""
    gather_per_matrix: bool = False
    """ZeRO-3 / MiCS gather one weight matrix at a time (prefetching the next); FSDP2 gathers a
    whole block. Sets the size of the gathered working set, not the traffic."""
    fused_loss_chunk: int = 0
    """Tokens per chunk of a fused LM head + cross-entropy used when the head is whole on a
    rank (triaxis: train.loss_chunk_tokens); 0 = full logits, then the loss."""


RUNTIMES: dict[str, Runtime] = {
    "triaxis": Runtime("triaxis", fsdp=True, flash_attention=True, sequence_parallel=True,
                       fused_qkv=False, eager_fp32_kernels=True, sp_saves_gathered_inputs=True,
                       fused_loss_chunk=4096),
    # Narayanan et al. 2021: no sequence parallelism yet, fused scale-mask-softmax (not flash),
    # fp16 with fp32 main gradients all-reduced.
    "megatron-2021": Runtime("megatron-2021", fsdp=False, flash_attention=False,
                             sequence_parallel=False, fused_qkv=True),
    # Zhang et al. 2022: DeepSpeed-style partitioned states inside a MiCS group, fp16 gathers
    # and fp16 gradient reduce-scatter, no tensor parallelism.
    "mics-2022": Runtime("mics-2022", fsdp=True, flash_attention=False,
                         sequence_parallel=False, fused_qkv=True, grad_reduce_bytes=2,
                         gather_per_matrix=True),
}


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    """MiCS replicas (model copies that all-reduce gradients once per step)."""
    dp_shard: int
    """MiCS partition-group size: ranks that shard parameters, gradients and optimizer states."""
    tp: int
    """Tensor-parallel degree (innermost, inside a node)."""
    pp: int
    """Pipeline stages."""
    micro_batch: int
    """Samples per rank per forward pass."""
    activation_checkpoint: str = "none"
    ac_every: int = 2
    """With selective: every ac_every-th block is checkpointed."""
    schedule: str = "none"
    """Pipeline schedule (none when pp = 1)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved-1f1b only)."""
    cpu_offload: bool = False
    """Sharded parameters, gradients and AdamW states live in host memory (FSDP2 offload)."""
    reshard_after_forward: bool = True
    """False: keep gathered blocks from forward to backward (one all-gather less, more memory)."""
    offload_checkpoints: bool = False
    """With full checkpointing: each block's saved input is copied to host memory during
    forward and prefetched back one block ahead in backward (MiCS's "prefetched activation
    offloading"; DeepSpeed's cpu_checkpointing). Evaluated when a layout names it, not searched:
    the triaxis training loop does not implement it."""

    def __post_init__(self) -> None:
        if self.offload_checkpoints and self.activation_checkpoint != "full":
            raise ValueError(f"offload_checkpoints needs activation_checkpoint='full', got "
                             f"{self.activation_checkpoint!r}: only block inputs are offloaded")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def num_micro_batches(self, global_batch: int) -> int:
        return global_batch // (self.micro_batch * self.dp)

    def describe(self) -> str:
        s = (f"tp={self.tp} pp={self.pp} dp_shard={self.dp_shard} "
             f"dp_replicate={self.dp_replicate} mb={self.micro_batch} "
             f"ac={self.activation_checkpoint}")
        if self.activation_checkpoint == "selective":
            s += f"/{self.ac_every}"
        if self.pp > 1:
            s += f" {self.schedule}" + (f"x{self.virtual_stages}" if self.virtual_stages > 1
                                        else "")
        if self.cpu_offload:
            s += " offload"
        if self.offload_checkpoints:
            s += " ckpt-offload"
        if not self.reshard_after_forward:
            s += " no-reshard"
        return s


@dataclass(frozen=True)
class SearchSpace:
    """Which options the enumeration may use (the CLI's restrictions)."""

    schedules: tuple[str, ...] = SCHEDULES
    ac_policies: tuple[str, ...] = AC_POLICIES
    ac_every: tuple[int, ...] = (2,)
    """Values of ac_every tried with selective checkpointing."""
    allow_offload: bool = True
    allow_no_reshard: bool = True
    max_pp: int = 0
    """0 = up to the number of blocks; 1 = no pipeline (the training runtime today)."""
    max_tp: int = 0
    """0 = up to GPUs per node: tensor parallelism never crosses the NVLink domain."""
    virtual_stages: tuple[int, ...] = (2, 4)
    """Model chunks per rank tried with interleaved-1f1b."""
    max_micro_batch: int = 64


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def valid_tp(shape: ModelShape, tp: int) -> bool:
    return shape.n_heads % tp == 0 and shape.n_kv_heads % tp == 0 and shape.ffn_dim % tp == 0


def enumerate_families(shape: ModelShape, world: int, gpus_per_node: int, global_batch: int,
                       space: SearchSpace) -> Iterator[list[Layout]]:
    """Every layout of `world` ranks the search space allows and the batch divides, grouped in
    families that differ only in activation checkpointing, offload and resharding.

    Rules: tp divides the heads, KV heads and MLP width and stays inside a node; pp <= blocks;
    dp = dp_replicate x dp_shard divides the global batch and micro_batch divides the per-replica
    batch; interleaving needs blocks divisible by pp x virtual stages; schedules need enough
    micro-batches (schedule_fits); offload and keeping parameters gathered (no reshard) only
    mean something with dp_shard > 1.
    """
    max_tp = space.max_tp or gpus_per_node
    max_pp = space.max_pp or shape.n_layers
    acs = _ac_options(space)
    for tp in divisors(world):
        if tp > max_tp or not valid_tp(shape, tp):
            continue
        for pp in divisors(world // tp):
            if pp > min(max_pp, shape.n_layers):
                continue
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            schedules = _schedules(shape, pp, space)
            for dp_shard in divisors(dp):
                offloads = (False, True) if (space.allow_offload and dp_shard > 1) else (False,)
                reshards = (False, True) if (space.allow_no_reshard and dp_shard > 1) \
                    else (True,)
                for mb in divisors(per_replica):
                    if mb > space.max_micro_batch:
                        break
                    for sched, v in schedules:
                        if not schedule_fits(sched, pp, per_replica // mb):
                            continue
                        yield [Layout(dp // dp_shard, dp_shard, tp, pp, mb, ac, every, sched, v,
                                      off, rs)
                               for ac, every in acs for off in offloads for rs in reshards]


def enumerate_layouts(shape: ModelShape, world: int, gpus_per_node: int, global_batch: int,
                      space: SearchSpace) -> Iterator[Layout]:
    for family in enumerate_families(shape, world, gpus_per_node, global_batch, space):
        yield from family


def recompute_rank(layout: Layout) -> float:
    """Fraction of blocks recomputed: 0 (none), 1/k (every k-th), 1 (full)."""
    return {"none": 0.0, "full": 1.0}.get(layout.activation_checkpoint, 1 / layout.ac_every)


def slower_or_equal(a: Layout, b: Layout) -> bool:
    """Within a family, is `a` at least as slow as `b` in every option (more recomputation,
    offload, resharding)? Then a fitting `b` makes `a` pointless for speed."""
    return (recompute_rank(a) >= recompute_rank(b) and a.cpu_offload >= b.cpu_offload
            and a.reshard_after_forward >= b.reshard_after_forward)


def schedule_fits(schedule: str, pp: int, num_micro: int) -> bool:
    """Enough micro-batches for the schedule to be what its bubble formula assumes: interleaving
    needs a multiple of pp (Megatron's rule), ZB-H1 at least pp, ZB-H2 at least 2·pp - 1."""
    if schedule == "interleaved-1f1b":
        return num_micro % pp == 0
    if schedule == "zb-h1":
        return num_micro >= pp
    if schedule == "zb-h2":
        return num_micro >= 2 * pp - 1
    return True


def _schedules(shape: ModelShape, pp: int, space: SearchSpace) -> list[tuple[str, int]]:
    if pp == 1:
        return [("none", 1)]
    out = []
    for s in space.schedules:
        if s == "interleaved-1f1b":
            out += [(s, v) for v in space.virtual_stages if shape.n_layers % (pp * v) == 0]
        else:
            out.append((s, 1))
    return out


def _ac_options(space: SearchSpace) -> list[tuple[str, int]]:
    out = []
    for ac in space.ac_policies:
        if ac == "selective":
            out += [(ac, k) for k in space.ac_every]
        else:
            out.append((ac, 2))
    return out
