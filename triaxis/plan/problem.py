"""What is planned and what a plan predicts: the model's shape, the runtimes modelled, a
candidate layout, the problem (model x hardware x runtime x batch) and the evaluated plan.

The planner must also evaluate published GPT-style models (a 4h GELU MLP, multi-head attention,
dropout), which `ModelArgs` cannot describe (it has no GELU flag). So the planner works on its own
`ModelShape`, built from `ModelArgs` for triaxis models and written out directly for the published
rows. Its parameter and FLOP counts are the model's own (`triaxis.model.args`), applied to it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from triaxis.errors import UserError, nearest
from triaxis.model.args import (
    ModelArgs,
    block_param_count,
    embedding_param_count,
    flops_per_token,
    head_param_count,
    param_counts,
)
from triaxis.model.presets import MOE_FIELDS
from triaxis.plan.hardware import Hardware
from triaxis.plan.runtimes import Runtime


@dataclass(frozen=True)
class ModelShape:
    name: str
    """A label for reports: the preset name, the config file or the published model."""
    dim: int
    """Hidden size d_model (h)."""
    n_layers: int
    """Transformer blocks (l)."""
    n_heads: int
    """Attention heads (a)."""
    n_kv_heads: int
    """Key/value heads (= n_heads for multi-head attention)."""
    ffn_dim: int
    """Hidden size of the MLP (4h for GPT, ~3.5h for Llama's SwiGLU)."""
    vocab_size: int
    """Vocabulary size (V)."""
    gated_mlp: bool = True
    """True: SwiGLU, three MLP matrices (triaxis). False: GELU, two matrices (GPT)."""
    tie_embeddings: bool = False
    """The LM head shares the embedding matrix."""
    dropout: bool = False
    """GPT-style dropout after attention and MLP: its 1-byte masks are kept for backward."""
    head_size: int = 0
    """Width of one attention head (0 = dim / n_heads; Qwen3's are wider)."""
    qk_norm: bool = False
    """RMSNorm weights on q and k per head (Qwen3): two head_dim vectors per block."""
    n_experts: int = 0
    """Experts per MoE block (0 = dense; triaxis.plan.experts prices the rest)."""
    moe_top_k: int = 2
    """Experts each token runs."""
    moe_ffn_dim: int = 0
    """Hidden size of one expert's SwiGLU."""
    n_shared_experts: int = 0
    """Experts every token runs besides its top k (one SwiGLU of this many x moe_ffn_dim)."""
    moe_first_dense: int = 0
    """The first this many blocks keep a dense MLP (ffn_dim)."""
    moe_capacity_factor: float = 0.0
    """Assignments an expert takes, x the mean (0 = dropless)."""

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.moe_first_dense

    @property
    def dense(self) -> ModelShape:
        """The same model with every block dense: what the dense cost model prices, before
        triaxis.plan.experts adds what the MoE blocks change."""
        return dataclasses.replace(self, n_experts=0) if self.n_experts else self

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    def block_params(self) -> int:
        """Parameters of one block: q, k, v, o, the MLP matrices and two norm weights."""
        return self._block_params

    @functools.cached_property
    def _block_params(self) -> int:
        # Cached on the (frozen) shape: the search asks for it twice per layout.
        return block_param_count(self)

    def embedding_params(self) -> int:
        return embedding_param_count(self)

    def head_params(self) -> int:
        """LM head (vocab x dim) + final norm; the head counts even when tied (it is computed)."""
        return head_param_count(self) + self.dim

    def total_params(self) -> int:
        return param_counts(self)["total"]

    def model_flops_per_token(self, seq_len: int) -> float:
        """6·N + 12·l·h·s (triaxis.model.args.flops_per_token)."""
        return float(flops_per_token(self, seq_len))

    def active_block_params(self) -> float:
        """Parameters one token's forward touches in a mean block (an MoE block: its router,
        top-k experts and shared experts in place of the dense MLP)."""
        counts = param_counts(self)
        head = head_param_count(self) + self.dim  # flops_params counts head and final norm
        return (counts["flops_params"] - head) / self.n_layers

    def recompute_flops_per_token(self, seq_len: int, recomputed_layers: float) -> float:
        """The extra forward of checkpointed blocks: 2·block + 4·h·s per recomputed block."""
        return recomputed_layers * (2.0 * self.active_block_params() + 4.0 * self.dim * seq_len)


def shape_from_args(args: ModelArgs, name: str) -> ModelShape:
    return ModelShape(
        name=name,
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        ffn_dim=args.ffn_dim,
        vocab_size=args.vocab_size,
        gated_mlp=True,
        tie_embeddings=args.tie_embeddings,
        **{f: getattr(args, f) for f in SHAPE_MOE_FIELDS},
    )


SHAPE_MOE_FIELDS = ("head_size", "qk_norm") + tuple(
    f for f in MOE_FIELDS if f in {x.name for x in dataclasses.fields(ModelShape)}
)
"""The ModelArgs fields a ModelShape carries besides the dense sizes (the same names)."""


def args_from_shape(shape: ModelShape, max_seq_len: int = 8192) -> ModelArgs:
    """The triaxis ModelArgs of a gated (SwiGLU) shape: what `predict_state_bytes_per_rank` and
    the training runtime consume."""
    assert shape.gated_mlp, "triaxis models are SwiGLU; a GELU shape has no ModelArgs"
    return ModelArgs(
        dim=shape.dim,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads,
        ffn_dim=shape.ffn_dim,
        vocab_size=shape.vocab_size,
        max_seq_len=max_seq_len,
        tie_embeddings=shape.tie_embeddings,
        **{f: getattr(shape, f) for f in SHAPE_MOE_FIELDS},
    )


def load_model(model: str, vocab_size: int | None = None) -> tuple[ModelShape, ModelArgs]:
    """A preset name (tiny, 8b, 70b, ...) or a triaxis CONFIG.toml whose [model] section is used."""
    from triaxis.config import load_config
    from triaxis.model.presets import PRESETS, build_model_args

    if model.endswith(".toml") or Path(model).is_file():
        cfg = load_config(model)
        args = build_model_args(cfg.model, vocab_size=vocab_size)
        return shape_from_args(args, Path(model).name), args
    if model not in PRESETS:
        hint = nearest(model, list(PRESETS))
        fix = f"did you mean {hint!r}?" if hint else "or pass a CONFIG.toml"
        raise UserError(
            f"--model {model!r} is neither a preset nor a .toml file; presets are "
            f"{list(PRESETS)}; {fix}"
        )
    args = dataclasses.replace(PRESETS[model])
    if vocab_size:
        args.vocab_size = vocab_size
    return shape_from_args(args, model), args


# ---------------------------------------------------------------------------------------------
# Runtimes and layouts


SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "interleaved-zb", "zbv")
"""The pipeline schedules the planner models, by the runtime's names (parallel.pp_schedule),
each with the stages per rank the runtime runs it with (triaxis.parallel.partition
.stages_per_rank: 2 for zbv and interleaved-zb). The zero-bubble ones follow Qi et al. 2023 with
equal F, B and W passes: interleaved-zb (PyTorch's ZB1P) is modelled as ZB-H1 (bubble
(p - 1)/3, an upper bound: its 2 stages per rank shrink it), zbv as ZB-H2 (no bubble; 2p - 1
micro-batches in flight, an upper bound: ZB-V keeps 1F1B's p)."""
AC_POLICIES = ("none", "selective", "op", "full")
"""Activation checkpointing the planner models: none, selective (every ac_every-th block),
op (op-level selective: every block keeps its matmul outputs, recomputes the cheap ops), full.
The runtime's spelling of each: Layout.runtime_ac."""

SEARCHED_OPTIONS: dict[str, tuple] = {
    "schedule": SCHEDULES,
    "activation_checkpoint": AC_POLICIES,
    "cpu_offload": (False, True),
    "reshard_after_forward": (True, False),
    "offload_checkpoints": (False, True),
    "hierarchical": (False, True),
}
"""Every value the search may give each Layout knob besides the degrees, micro-batch, ac_every
and virtual stages: the table tests/test_plan_runs.py walks, proving the trainer accepts and runs
each one (`mapping.parallel_config` maps a layout onto the trainer's [parallel] section). A knob
the cost model knows but the trainer lacks stays at its off value here. Adding an option to the
search means adding its values here and its field to `parallel_config`. `hierarchical` is
searched only where a dp_shard group spans nodes (several members in each); `offload_checkpoints`
only with full checkpointing, where a bf16 run allows offload."""


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
    """One of AC_POLICIES."""
    ac_every: int = 2
    """With selective: every ac_every-th block is checkpointed."""
    schedule: str = "none"
    """Pipeline schedule (none when pp = 1)."""
    virtual_stages: int = 1
    """Stages per pipeline rank (parallel.pp_virtual_stages): v for interleaved-1f1b, 2 for zbv
    and interleaved-zb (as the runtime runs them), 1 otherwise."""
    cpu_offload: bool = False
    """Sharded parameters, gradients and AdamW states live in host memory (FSDP2 offload)."""
    reshard_after_forward: bool = True
    """False: keep gathered blocks from forward to backward (one all-gather less, more memory)."""
    offload_checkpoints: bool = False
    """With full checkpointing: each block's saved input is copied to host memory during
    forward and prefetched back one block ahead in backward (MiCS's "prefetched activation
    offloading"; DeepSpeed's cpu_checkpointing). The trainer's parallel.activation_offload."""

    hierarchical: bool = False
    """MiCS hierarchical all-gather / reduce-scatter (parallel.hierarchical): a dp_shard group
    spanning nodes gathers across nodes among same-local-rank peers, then inside the node."""
    cp: int = 1
    """Context-parallel degree: ranks that split each sequence (ring attention); they read the
    same samples and FSDP shards over dp_shard x cp (triaxis.plan.context prices it)."""
    ep: int = 1
    """Expert-parallel degree (MoE models): the innermost ep ranks of dp_shard split each MoE
    block's experts and exchange tokens by all-to-all (triaxis.plan.experts prices it)."""

    def __post_init__(self) -> None:
        if self.offload_checkpoints and self.activation_checkpoint != "full":
            raise ValueError(
                f"offload_checkpoints needs activation_checkpoint='full', got "
                f"{self.activation_checkpoint!r}: only block inputs are offloaded"
            )

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp * self.cp

    def runtime_ac(self) -> dict[str, object]:
        """The trainer's [parallel] fields for this layout's checkpointing and its offload."""
        op = self.activation_checkpoint == "op"
        return {
            "activation_checkpoint": "selective" if op else self.activation_checkpoint,
            "ac_selective": "op" if op else "block",
            "ac_every": self.ac_every,
            "activation_offload": self.offload_checkpoints,
        }

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def num_micro_batches(self, global_batch: int) -> int:
        return global_batch // (self.micro_batch * self.dp)

    def describe(self) -> str:
        ep = f"ep={self.ep} " if self.ep > 1 else ""  # inside dp_shard: printed after it
        s = (
            f"tp={self.tp} pp={self.pp} dp_shard={self.dp_shard} {ep}"
            f"dp_replicate={self.dp_replicate} mb={self.micro_batch} "
            f"ac={self.activation_checkpoint}"
        )
        if self.cp > 1:
            s = f"cp={self.cp} " + s
        if self.activation_checkpoint == "selective":
            s += f"/{self.ac_every}"
        if self.pp > 1:
            s += f" {self.schedule}" + (
                f"x{self.virtual_stages}" if self.virtual_stages > 1 else ""
            )
        if self.cpu_offload:
            s += " offload"
        if self.offload_checkpoints:
            s += " ckpt-offload"
        if not self.reshard_after_forward:
            s += " no-reshard"
        if self.hierarchical:
            s += " hierarchical"
        return s


# ---------------------------------------------------------------------------------------------
# A problem and its evaluated plans


@dataclass(frozen=True)
class LoraPlan:
    """[lora] as the planner needs it: adapter rank and the target patterns."""

    rank: int
    patterns: tuple[str, ...]


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
    attention_span: int = 0
    """Keys per query that attention costs: with document masking the expected document
    length (data.mean_document_tokens), 0 = seq_len (one causal sequence)."""
    lora: LoraPlan | None = None
    """A LoRA run (frozen base, adapters trained): priced by triaxis.plan.lora."""
    float8: str = "off"
    """train.float8 of the run (off | tensorwise | rowwise): priced by triaxis.plan.float8."""
    float8_min_dim: int = 1024
    """train.float8_min_dim (its default): the conversion's size filter."""

    @property
    def attn_keys(self) -> int:
        return min(self.seq_len, self.attention_span) if self.attention_span else self.seq_len

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
