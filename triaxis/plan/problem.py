"""What is planned (Problem) and what an evaluated layout predicts (Plan and its breakdowns)."""

from __future__ import annotations

from dataclasses import dataclass, field

from triaxis.plan.hardware import Hardware
from triaxis.plan.layout import Layout, Runtime
from triaxis.plan.shape import ModelShape


@dataclass(frozen=True, eq=False)
class Problem:
    """A model on some hardware under a runtime, with a batch. Hashed by identity: the cost
    model caches its per-problem pieces on it."""

    shape: ModelShape
    hw: Hardware
    runtime: Runtime
    seq_len: int
    global_batch: int
    """Samples per optimizer step."""

    @property
    def elem(self) -> int:
        """Bytes of an activation element: bf16 on GPUs, fp32 on CPU."""
        return 2 if self.hw.gpu.bf16 else 4


@dataclass
class MemoryBreakdown:
    """Bytes per GPU at the peak (the heaviest pipeline stage)."""

    params: float
    grads: float
    optim: float
    activations: float
    comm_buffers: float
    """FSDP all-gather outputs (gathered bf16 blocks and root), reduce-scatter inputs, gathered
    TP activations."""
    host_per_node: float = 0.0
    """Offloaded states on the host, per node."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optim + self.activations + self.comm_buffers


@dataclass
class TimeBreakdown:
    """Seconds per optimizer step; the parts add up to the step time."""

    compute: float
    exposed_comm: dict[str, float] = field(default_factory=dict)
    """Exposed communication per mesh axis (tp, dp_shard, dp_replicate, pp) and offload copies."""
    bubble: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + sum(self.exposed_comm.values()) + self.bubble + self.optimizer


@dataclass
class Plan:
    """One evaluated layout."""

    layout: Layout
    memory: MemoryBreakdown
    time: TimeBreakdown
    num_micro_batches: int
    """Micro-batches per pipeline per step (gradient accumulation)."""
    tokens_per_s: float
    mfu: float
    """Model FLOPs (6N + 12·l·h·s per token, no recompute) / (step time x peak x GPUs)."""
    hw_tflops_per_gpu: float
    """TFLOP/s per GPU counting the recomputed forward (the Megatron paper's convention)."""
    fits: bool
