"""The run configuration's sections: one dataclass per TOML table.

Every field carries its documentation in the docstring that follows it (the attribute-docstring
convention), which `triaxis config --fields` prints and docs/config.md is generated from
(`triaxis.config_doc`); a field's own range rule is in its definition (`triaxis.fields.ranged`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from triaxis.fields import ranged


@dataclass
class ModelConfig:
    preset: str = "small"
    """Model shape: tiny | tiny-moe | small | 1b | 8b | 70b | 405b | mixtral-8x7b. Fields set
    below override the preset."""
    dim: int | None = ranged(None, ge=1)
    """Hidden size d_model (unset = from the preset)."""
    n_layers: int | None = ranged(None, ge=1)
    """Number of transformer blocks (unset = from the preset)."""
    n_heads: int | None = ranged(None, ge=1)
    """Attention heads (unset = from the preset)."""
    n_kv_heads: int | None = ranged(None, ge=1)
    """Key/value heads for grouped-query attention; must divide n_heads (unset = from the
    preset)."""
    ffn_dim: int | None = ranged(None, ge=1)
    """Hidden size of the SwiGLU MLP (unset = from the preset)."""
    vocab_size: int | None = ranged(None, ge=1)
    """Vocabulary size (unset = the prepared data's tokenizer, else the preset)."""
    max_seq_len: int | None = ranged(None, ge=1)
    """Longest sequence the RoPE tables cover (unset = from the preset)."""
    tie_embeddings: bool | None = None
    """Share the input embedding with the LM head (unset = from the preset)."""
    rope_theta: float | None = ranged(None, gt=0)
    """RoPE base frequency (unset = from the preset)."""
    rope_scaling: str | None = None
    """RoPE frequency scaling: none | llama3 (Llama 3.1's long-context scaling, the four
    rope_* fields below); unset = from the preset (none for every preset)."""
    rope_scaling_factor: float = ranged(8.0, gt=0)
    """llama3 scaling: how much the low frequencies are slowed (8 in Llama 3.1, 32 in 3.2)."""
    rope_low_freq_factor: float = ranged(1.0, gt=0)
    """llama3 scaling: rotations turning fewer times than this over the original context are
    fully scaled."""
    rope_high_freq_factor: float = ranged(4.0, gt=0)
    """llama3 scaling: rotations turning more times than this over the original context are
    left alone; in between, the two blend linearly."""
    rope_original_max_seq_len: int = ranged(8192, ge=1)
    """llama3 scaling: the context length of pre-training, before the extension."""
    norm_eps: float = ranged(1e-5, gt=0, lt=1)
    """Epsilon of RMSNorm."""
    n_experts: int | None = ranged(None, ge=0)
    """Mixture of experts: routed SwiGLU experts per MoE block; 0 = a dense model (unset = from
    the preset: tiny-moe 4, mixtral-8x7b 8, others 0). docs/models.md#mixture-of-experts."""
    moe_top_k: int | None = ranged(None, ge=1)
    """Experts each token is routed to, at most n_experts (unset = from the preset: 2)."""
    moe_ffn_dim: int | None = ranged(None, ge=1)
    """Hidden size of one expert's SwiGLU MLP (unset = from the preset, else ffn_dim)."""
    n_shared_experts: int | None = ranged(None, ge=0)
    """Experts every token goes through beside the routed ones (unset = from the preset)."""
    moe_first_dense: int | None = ranged(None, ge=0)
    """The first this many blocks keep a dense MLP, DeepSeek-style (unset = from the preset)."""
    moe_capacity_factor: float | None = ranged(None, ge=0)
    """Each expert takes at most factor x tokens x top_k / n_experts assignments of a
    micro-batch, the rest dropped and counted; 0 = dropless (unset = from the preset: 0)."""
    moe_aux_loss_coef: float | None = ranged(None, ge=0)
    """Weight of the load-balancing auxiliary loss in the gradient; 0 = off (unset = from the
    preset: tiny-moe 0.01, mixtral-8x7b 0.02)."""
    moe_bias_update_rate: float | None = ranged(None, ge=0)
    """Aux-free balancing: each optimizer step moves every expert's routing bias this much
    toward balance; 0 = off (unset = from the preset: 0)."""
    moe_norm_topk: bool | None = None
    """Renormalize the kept top-k router weights to sum to 1, as Mixtral does (unset = from
    the preset: true)."""
    head_dim: int | None = ranged(None, ge=2)
    """Size of one attention head (unset = dim / n_heads); Qwen3-MoE's is larger (128 at
    dim 2048 with 32 heads)."""
    qk_norm: bool | None = None
    """RMSNorm over each head of q and of k before RoPE, as Qwen3 does (unset = false)."""


@dataclass
class SourceConfig:
    """One source of a weighted mixture: a `[[data.sources]]` table (docs/data.md#mixtures)."""

    path: str = ""
    """Folder or s3:// prefix written by `triaxis prepare` (every source: the same tokenizer)."""
    weight: float = ranged(1.0, gt=0)
    """Share of the samples drawn from this source, relative to the other sources' weights."""
    epochs: float | None = ranged(None, gt=0)
    """At most this many passes over the source's training windows (unset = repeat it as
    needed); once exhausted, its weight goes to the other sources in proportion to theirs."""
    name: str = ""
    """Label in metrics (tokens/NAME, val_loss/NAME); empty = the path's last component."""

    def label(self) -> str:
        return self.name or self.path.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class DataConfig:
    path: str = "data/stdlib"
    """Folder or s3:// prefix written by `triaxis prepare` (shards + manifest.json)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture instead of data.path: `[[data.sources]]` tables in the TOML file,
    each with path, weight, optional epochs and name (the [[data.sources]] table below)."""
    seq_len: int = ranged(256, ge=1)
    """Tokens per training sample (the model sees seq_len inputs and seq_len targets)."""
    seed: int = ranged(1234, ge=0)
    """Seed of the global sample order; sample i is a pure function of (seed, i)."""
    cache_dir: str = ""
    """Local folder caching s3:// shards (empty = system temp); a subfolder per process, removed at exit."""  # noqa: E501  (one line: docs/config.md's row)
    cache_gib: float = ranged(4.0, gt=0)
    """Bound of that cache per process and split, in GiB; least recently used shards are evicted."""
    shuffle_shards: int = ranged(0, ge=0)
    """0 = one global shuffle over every window of the split (each step reads shards all over
    it: a cache smaller than the split thrashes). N = shuffle within groups of N randomly
    chosen shard-sized blocks: a step reads from about N shards, so an S3 cache of 4·N shards
    suffices; N >= 8 keeps batches well mixed."""
    verify: Literal["sha256", "size"] = "sha256"
    """Check local shards against the manifest when a run opens them: sha256 = size, sha256
    and token range, each file read once (remembered until it changes); size = sizes only."""
    document_mask: bool = False
    """Attend only within each document of a packed window (documents end with the tokenizer's
    end-of-document token, which belongs to the document it ends) and restart RoPE positions at
    each document; false = one causal sequence across document boundaries."""
    mean_document_tokens: int = ranged(0, ge=0)
    """With document_mask: the expected document length in tokens (sum of len² / sum of len for
    mixed lengths); attention FLOPs in the planner and MFU count min(seq_len, this) keys per
    query instead of seq_len. 0 = unknown: count the full window."""

    def tokenizer_path(self) -> str:
        """The prepared folder whose tokenizer the run uses (a mixture's sources share one)."""
        return self.sources[0].path if self.sources else self.path


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints."""
    steps: int = ranged(200, ge=1)
    """Optimizer steps to train."""
    global_batch: int = ranged(16, ge=1)
    """Samples per optimizer step, summed over data-parallel ranks and micro-batches."""
    micro_batch: int = ranged(8, ge=1)
    """Samples per rank per forward pass; gradient accumulation = global_batch / (micro_batch x dp)."""  # noqa: E501
    lr: float = ranged(1e-3, ge=0, le=10)
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)
    """Final learning rate of the cosine decay, as a fraction of lr."""
    warmup_steps: int = ranged(20, ge=0)
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = ranged(0.1, ge=0, le=10)
    """AdamW decoupled weight decay (applied to matrices, not to norms)."""
    beta1: float = ranged(0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = ranged(0.95, ge=0, lt=1)
    """AdamW beta2."""
    grad_clip: float = ranged(1.0, ge=0)
    """Clip the global gradient norm to this value (0 = no clipping)."""
    seed: int = ranged(0, ge=0)
    """Seed of the weight initialization."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks CUDA when available."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: auto = bf16 autocast on GPU, fp32 on CPU. Master weights stay fp32."""
    compile: bool = False
    """torch.compile each transformer block."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager for quick checks)."""
    float8: Literal["off", "tensorwise", "rowwise", "auto"] = "off"
    """FP8 GEMMs in the transformer blocks' linears (torchao Float8Linear; weights, optimizer
    state and checkpoints stay high precision): tensorwise (one scale per tensor, float8 FSDP
    all-gather on GPUs) or rowwise (a scale per row: closer to bf16, slower). Needs the
    `float8` extra; pays on H100/H200 at widths >= 4096 (docs/precision.md). auto: with
    parallel.auto, the planner picks off, tensorwise or rowwise with the layout and logs why."""
    float8_min_dim: int = ranged(1024, ge=16)
    """Convert only linears whose in and out features are both >= this (and divisible by 16):
    smaller GEMMs lose more to the float8 casts than they gain."""
    loss_chunk_tokens: int = ranged(4096, ge=0)
    """Tokens per chunk of the fused LM head + cross-entropy, which never holds the logits of
    the whole micro-batch (0 = the plain head, then the loss on full logits). With tp > 1 the
    vocabulary-parallel loss and with pp > 1 the pipeline's loss are used instead."""
    val_every: int = ranged(50, ge=0)
    """Run validation every this many steps (0 = never)."""
    val_batches: int = ranged(4, ge=1)
    """Validation batches of global_batch samples each (the same samples for every layout)."""
    on_bad_loss: Literal["skip", "rollback", "off"] = "skip"
    """Non-finite gradients or loss, or a spiking logged loss: skip the update (decided on the
    device, no host sync; the host learns of it at the next log step); rollback to the last
    checkpoint and skip the batch; or off (no check)."""
    spike_factor: float = ranged(0.0, ge=0)
    """A logged loss above spike_factor x the running mean of the logged losses counts as bad
    (0 = only non-finite ones)."""
    max_bad_steps: int = ranged(5, ge=1)
    """Stop with an error after this many bad steps."""
    exit_after_steps: int = ranged(0, ge=0)
    """Save and exit after this many steps in this invocation (0 = run to train.steps): for
    time-sliced jobs that resume on the next launch."""
    hang_timeout_s: float = ranged(480.0, ge=0)
    """Watchdog: a rank with no finished loop iteration for this long dumps its Python stacks
    and the job stops, naming the stuck rank(s) (0 = off). Above the slowest step, validation
    or blocking checkpoint save; below train.dist_timeout_s (checked), so that it fires before
    a stuck collective times out and the hang forensics get their dumps."""
    dist_timeout_s: float = ranged(600.0, gt=0)
    """Seconds a rank waits for its peers to join the process group (the store, the group's
    connections, every later group), and gloo's collective timeout. Generous: ranks of a job
    start seconds to minutes apart on a loaded machine or a slow file system; a peer that dies
    is noticed sooner (its connections close), a stuck one by hang_timeout_s."""


@dataclass
class ParallelConfig:
    auto: Literal["off", "speed", "memory"] = "off"
    """Let the planner choose the whole layout `triaxis plan` prints for this world size --
    degrees, pipeline schedule, stages per rank and stage split, micro-batch, checkpointing,
    offload (speed: fastest predicted step; memory: smallest peak memory). Overrides them below."""
    dp_replicate: int = ranged(1, ge=1)
    """Data-parallel replicas: model copies (MiCS partition groups) that all-reduce gradients."""
    dp_shard: int = ranged(-1, ge=-1)
    """Sharded-data-parallel degree: the MiCS partition-group size (-1 = the rest of the world)."""
    tp: int = ranged(1, ge=1)
    """Tensor-parallel degree (with sequence parallelism on norms); must divide the heads."""
    pp: int = ranged(1, ge=1)
    """Pipeline-parallel degree: stages of contiguous blocks on different ranks."""
    cp: int = ranged(1, ge=1)
    """Context-parallel degree: ranks that split every sequence (head-tail chunks, ring
    attention); data.seq_len must be a multiple of 2 x cp. FSDP shards over dp_shard x cp."""
    ep: int = ranged(1, ge=1)
    """Expert-parallel degree: each MoE block's experts split over ep consecutive dp_shard ranks,
    tokens sent to them by all-to-all; must divide dp_shard and model.n_experts (1 = off)."""
    pp_schedule: Literal[
        "gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zb", "zbv", "dualpipev"
    ] = "1f1b"
    """Pipeline schedule; interleaved ones need pp_virtual_stages >= 2, zbv/dualpipev exactly 2."""
    pp_virtual_stages: int = ranged(1, ge=1)
    """Stages per pipeline rank (v): more, smaller stages shrink the bubble to (p-1)/(v·m)."""
    pp_memory_weight: float = ranged(0.0, ge=0, le=1)
    """Stage partitioning objective: 0 balances compute (speed), 1 balances memory, between blends."""  # noqa: E501
    pp_layers: str = ""
    """Explicit blocks per stage, e.g. "5,5,6" (overrides the automatic partitioner)."""
    fsdp_always: bool = False
    """Wrap with FSDP even when there is nothing to shard (one data-parallel rank): measures
    the wrapper's own cost (bench/gpu_session.py, part triaxis-fsdp)."""
    fsdp_autocast: bool = False
    """Under FSDP, keep the parameters fp32 and take bf16 compute from autocast, as one process
    does, instead of FSDP's bf16 mixed-precision policy: the single-process numerics (fp32
    residual stream), at twice the all-gather bytes. For measuring the wrapper's cost against
    the plain run; training wants the policy (false)."""
    reshard_after_forward: bool = True
    """True: free gathered parameters after forward (ZeRO-3); False: keep them until backward."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer states in CPU memory."""
    hierarchical: Literal["auto", "on", "off"] = "auto"
    """MiCS hierarchical all-gather and reduce-scatter when a dp_shard group spans nodes: across
    nodes among same-local-rank peers (every NIC at once), then within the node. auto: on when
    a group spans nodes with several members in each (node size: torchrun's LOCAL_WORLD_SIZE)."""
    loss_parallel: bool = False
    """With tp > 1: compute cross-entropy on vocabulary-sharded logits (no all-gather of logits)."""
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: none | full (every block) | selective (ac_selective
    says which part: every ac_every-th block, or the cheap ops of every block)."""
    ac_selective: Literal["block", "op"] = "block"
    """What selective checkpointing recomputes. block: every ac_every-th block whole; op: in
    every block the cheap ops (norms, rotary, SiLU), keeping the matmul and attention-kernel
    outputs (torchtitan's selective)."""
    ac_every: int = ranged(2, ge=1)
    """For selective checkpointing by block: checkpoint every k-th block."""
    activation_offload: bool = False
    """Keep the inputs checkpointed blocks save in host memory (pinned; copied on a side stream
    on GPU) and bring each back for its recompute. Needs checkpointed blocks: full, or
    selective by block."""


@dataclass
class CheckpointConfig:
    interval: int = ranged(100, ge=0)
    """Save every this many steps (0 = only at the end of training)."""
    dir: str = ""
    """Checkpoint folder or s3://bucket/prefix (empty = RUN_DIR/checkpoints)."""
    resume: str = "auto"
    """auto: resume from the latest valid checkpoint in dir, if any; none: start fresh (dir
    must hold no checkpoints)."""
    keep_last: int = ranged(3, ge=0)
    """Keep this many most recent checkpoints (0 = keep all)."""
    keep_every: int = ranged(0, ge=0)
    """Also keep every checkpoint whose step is a multiple of this (0 = none)."""
    async_save: bool = True
    """Write checkpoints in the background; training blocks only while the state is staged."""
    verify_on_resume: bool = True
    """Check every item against its write-time checksum as it loads on resume; skip bad ones."""
    initial: str = ""
    """Checkpoint whose model weights start a fresh run (fine-tuning, e.g. from import-hf)."""
    save_final: bool = True
    """Save a checkpoint at the last step."""
    retry_s: float = 300.0
    """Retry a save that meets transient storage errors this long (backoff, all ranks together)."""
    max_failed_saves: int = 3
    """Stop after this many failed saves in a row; fewer are skipped with a warning."""
    hf: Literal["off", "final", "every"] = "off"
    """Also write a Hugging Face folder into each checkpoint's hf/ (final: the last step's
    only; every: each committed checkpoint): safetensors + config.json + tokenizer files, or
    for a LoRA run the PEFT adapter (docs/finetuning.md#the-runs-own-hugging-face-folder)."""
    hf_dtype: Literal["fp32", "bf16"] = "bf16"
    """dtype of the weights in checkpoint.hf's folder."""
    memory_interval: int = ranged(0, ge=0)
    """Also stage every rank's shard of the training state into host memory every this many
    steps (0 = off): the memory tier, held by a per-node keeper that `triaxis launch` starts,
    which survives a worker crash; a restart restores from it when it is newer than the
    newest durable checkpoint (docs/resilience.md#the-memory-tier)."""
    memory_keep: int = ranged(2, ge=1)
    """How many memory-tier steps each node's keeper holds (its host memory is about
    (memory_keep + 1) x the node's ranks' state)."""
    memory_buddy: Literal["auto", "on", "off"] = "auto"
    """Also replicate each node's memory copies to the next node's keeper over TCP, so a lost
    node's ranks restore from its buddy (auto: on with 2 or more nodes; doubles the tier's host
    memory per node)."""
    memory_buddy_port: int = ranged(0, ge=0, le=65535)
    """TCP port of each node's buddy server (0 = any free port; the nodes exchange addresses
    when the workers start). Keep it on the cluster's private network."""


@dataclass
class MetricsConfig:
    log_every: int = ranged(10, ge=1)
    """Log loss, tokens/s and MFU every this many steps."""
    reset_peak_memory_after: int = ranged(0, ge=0)
    """Reset the GPU's peak-memory counter after this step (0 = never): later records'
    max_memory_gib is the steady-state peak, without initialization and compilation. For
    benchmarks (bench/gpu_session.py sets its warm-up steps); a CPU process's resident peak
    cannot be reset (the run says so once)."""
    tensorboard: bool = True
    """Write TensorBoard event files into RUN_DIR/tb."""
    progress: bool = True
    """Show a live progress bar on a terminal."""
    mlflow: str = ""
    """MLflow tracking URI to mirror metrics.jsonl to ("" = off): "file:/path" (a local store),
    "http://host:5000" (a tracking server) or a SageMaker MLflow tracking server ARN (needs the
    sagemaker-mlflow plugin). Rank 0 only; pip install 'triaxis[mlflow]'."""
    mlflow_experiment: str = "triaxis"
    """MLflow experiment the run goes into (created when missing)."""
    wandb: str = ""
    """Weights & Biases project to mirror metrics.jsonl to ("" = off). Rank 0 only; pip
    install 'triaxis[wandb]'."""
    wandb_entity: str = ""
    """W&B entity (user or team) owning the project ("" = the account's default)."""
    wandb_mode: Literal["online", "offline"] = "online"
    """offline: W&B writes its run files under RUN_DIR/wandb only (`wandb sync` uploads them
    later), for nodes without network."""
    tracker_run_name: str = ""
    """The run's name in MLflow and W&B ("" = the run folder's name). A resumed run keeps the
    tracker run it started with (RUN_DIR/tracker_*.json)."""
    tracker_flush_s: float = ranged(30.0, ge=0)
    """At the end of training, wait at most this long for an unreachable tracker to take the
    records still queued (they are in metrics.jsonl either way)."""


@dataclass
class ProfileConfig:
    steps: str = ""
    """Steps to trace with the PyTorch profiler, "A-B" or "A" (e.g. "5-6"; "" = none): one
    Chrome/Perfetto trace per rank in RUN_DIR/profile/. SIGUSR2 to a rank traces its next
    signal_steps steps too."""
    signal_steps: int = ranged(2, ge=1)
    """Steps a SIGUSR2 traces, from the next step on."""
    memory_snapshot: bool = False
    """Also record the CUDA allocator's history over the traced steps and write it as a pickle
    per rank (torch.cuda.memory._memory_viz renders it). GPU only."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Fine-tune low-rank adapters instead of the model: the base weights stay frozen and the
    optimizer holds only the adapters (docs/finetuning.md#lora)."""
    rank: int = ranged(8, ge=1)
    """Rank r of each adapter: A is (r, in), B is (out, r)."""
    alpha: float = ranged(16.0, gt=0)
    """Scale numerator: the adapter's output is multiplied by alpha / rank."""
    dropout: float = ranged(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (0 = none; the base path never drops)."""
    targets: str = "attention.wq,attention.wk,attention.wv,attention.wo"
    """Comma-separated glob patterns over the model's Linear names, matched against the full
    name or its tail, e.g. "attention.w*,feed_forward.w2"; each must match a Linear."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "metrics": MetricsConfig,
    "profile": ProfileConfig,
    "lora": LoraConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def checkpoint_dir(self) -> str:
        return (
            self.checkpoint.dir.rstrip("/")
            if self.checkpoint.dir
            else str(Path(self.train.run_dir) / "checkpoints")
        )

    def user_paths(self) -> list[str]:
        """Every path this config names: an OS error on one of them is the user's to fix."""
        sources = [s.path for s in self.data.sources]
        return [
            self.train.run_dir,
            self.checkpoint_dir(),
            self.checkpoint.initial,
            self.data.path,
            self.data.cache_dir,
            *sources,
        ]
