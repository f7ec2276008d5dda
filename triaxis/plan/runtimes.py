"""The training systems the cost model knows: what each saves for backward and overlaps.

`triaxis` is this repository; the others describe the systems of the published rows the model
is checked against (triaxis.plan.evidence).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    "triaxis": Runtime(
        "triaxis",
        fsdp=True,
        flash_attention=True,
        sequence_parallel=True,
        fused_qkv=False,
        eager_fp32_kernels=True,
        sp_saves_gathered_inputs=True,
        fused_loss_chunk=4096,
    ),
    # Narayanan et al. 2021: no sequence parallelism yet, fused scale-mask-softmax (not flash),
    # fp16 with fp32 main gradients all-reduced.
    "megatron-2021": Runtime(
        "megatron-2021", fsdp=False, flash_attention=False, sequence_parallel=False, fused_qkv=True
    ),
    # Zhang et al. 2022: DeepSpeed-style partitioned states inside a MiCS group, fp16 gathers
    # and fp16 gradient reduce-scatter, no tensor parallelism.
    "mics-2022": Runtime(
        "mics-2022",
        fsdp=True,
        flash_attention=False,
        sequence_parallel=False,
        fused_qkv=True,
        grad_reduce_bytes=2,
        gather_per_matrix=True,
    ),
}
