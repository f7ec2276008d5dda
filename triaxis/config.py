"""Typed run configuration: one dataclass per section, loaded from TOML plus
`--section.field=value`.

Every field carries its documentation in the docstring that follows it (the attribute-docstring
convention), which `triaxis config --fields` prints and docs/config.md is generated from
(`triaxis.config_doc`). Validation lives in `Config.validate`, the one place that knows the
rules between fields; each error names the value, the rule and the fix.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from triaxis.errors import UserError, nearest
from triaxis.fields import check_fields, ranged


@dataclass
class ModelConfig:
    preset: str = "small"
    """Model shape: tiny | small | 1b | 8b | 70b | 405b. Fields set below override the preset."""
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
    hang_timeout_s: float = 1800.0
    """Watchdog: a rank with no finished loop iteration for this long dumps its Python stacks
    and the job stops, naming the stuck rank(s) (0 = off). Above the slowest step, validation
    or blocking checkpoint save."""


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
    the wrapper's own cost (bench/gpu_speed.py --fsdp)."""
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
    every block the cheap ops (norms, rotary, attention core, SiLU), keeping the matmul outputs
    (Megatron's and torchtitan's selective)."""
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


@dataclass
class MetricsConfig:
    log_every: int = ranged(10, ge=1)
    """Log loss, tokens/s and MFU every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files into RUN_DIR/tb."""
    progress: bool = True
    """Show a live progress bar on a terminal."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "metrics": MetricsConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def checkpoint_dir(self) -> str:
        return (
            self.checkpoint.dir.rstrip("/")
            if self.checkpoint.dir
            else str(Path(self.train.run_dir) / "checkpoints")
        )


# ---------------------------------------------------------------------------------------------
# Loading: TOML file, then command-line overrides, each value coerced to the field's type.


def _coerce(section: str, name: str, raw: Any, hint: Any) -> Any:
    """Convert `raw` (TOML value or command-line string) to the field type `hint`."""
    where = f"{section}.{name}"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        return _coerce(section, name, raw, args[0])
    if origin is Literal:
        choices = list(typing.get_args(hint))
        if raw not in choices:
            raise UserError(f"{where}={raw!r} is not a valid choice; use one of {choices}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{where}={raw!r} must be a boolean; use true or false")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise UserError(f"{where}={raw!r} must be {hint.__name__}, not a boolean")
        try:
            value = hint(raw)
        except (TypeError, ValueError):
            raise UserError(f"{where}={raw!r} must be {hint.__name__}; e.g. {where}=8") from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise UserError(f"{where}={raw!r} must be a whole number")
        return value
    if origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        return _coerce_tables(where, raw, typing.get_args(hint)[0])
    if hint is str:
        if not isinstance(raw, str):
            raise UserError(f'{where}={raw!r} must be a string; quote it in TOML: {name} = "..."')
        return raw
    raise AssertionError(f"unsupported config type {hint} for {where}")


def _coerce_tables(where: str, raw: Any, cls: type) -> list:
    """A TOML array of tables (`[[data.sources]]`) -> a list of `cls`, each key checked."""
    example = f'[[{where}]] tables in the TOML config file, e.g. [[{where}]] path = "data/web"'
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise UserError(f"{where}={raw!r} must be given as {example}")
    if not raw:
        raise UserError(f"{where} is an empty list; give one or more {example}, or drop it")
    hints = typing.get_type_hints(cls)
    items = []
    for i, table in enumerate(raw):
        item = cls()
        for key, value in table.items():
            if key not in hints:
                hint = nearest(key, list(hints))
                fix = f"did you mean {hint}?" if hint else f"valid keys: {sorted(hints)}"
                raise UserError(f"unknown key {where}[{i}].{key}; {fix}")
            setattr(item, key, _coerce(f"{where}[{i}]", key, value, hints[key]))
        items.append(item)
    return items


def _set(cfg: Config, section: str, name: str, raw: Any) -> None:
    if section not in SECTIONS:
        hint = nearest(section, list(SECTIONS))
        fix = f"did you mean [{hint}]?" if hint else f"sections are {list(SECTIONS)}"
        raise UserError(f"unknown config section [{section}]; {fix}")
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        hint = nearest(name, list(hints))
        fix = f"did you mean {section}.{hint}?" if hint else f"valid keys: {sorted(hints)}"
        raise UserError(f"unknown config key {section}.{name}; {fix}")
    setattr(getattr(cfg, section), name, _coerce(section, name, raw, hints[name]))


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """`--section.field=value` or `--section.field value` -> [(section, field, value)]."""
    out: list[tuple[str, str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(
                f"unexpected argument {arg!r}; overrides look like --section.field=value, "
                "e.g. --train.steps=100"
            )
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise UserError(f"override {arg!r} has no value; write {arg}=VALUE")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        out.append((section, name.replace("-", "_"), value))
        i += 1
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- TOML file <- command-line overrides, each field checked against its own
    rules; the rules between fields are `validate`'s."""
    cfg = Config()
    given: set[tuple[str, str]] = set()  # (section, key) set by the file or an override
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path} does not exist; pass an existing .toml file")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(
                f"config file {path} is not UTF-8 text (byte {e.start}); pass a .toml file"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise UserError(f"{path}: top-level key {section!r} must be a [section] table")
            for name, raw in values.items():
                _set(cfg, section, name, raw)
                given.add((section, name))
    for section, name, raw in parse_overrides(overrides or []):
        _set(cfg, section, name, raw)
        given.add((section, name))
    if cfg.data.sources and ("data", "path") in given:
        raise UserError(
            f"data.path={cfg.data.path!r} and data.sources are both set; a mixture reads only "
            "its [[data.sources]]: drop data.path (or drop data.sources for one source)"
        )
    check_config(cfg)  # each field's own rules now, before anything is touched
    return cfg


def check_config(cfg: Config) -> None:
    """Every field against its own rules (range, finite, 64-bit, no control characters)."""
    for section in SECTIONS:
        check_fields(getattr(cfg, section), section)
    labels: dict[str, int] = {}
    for i, src in enumerate(cfg.data.sources):
        where = f"data.sources[{i}]"
        if not src.path:
            raise UserError(f'{where} has no path; set path = "FOLDER or s3://PREFIX" in it')
        if src.label() in labels:
            raise UserError(
                f"{where} and data.sources[{labels[src.label()]}] are both named "
                f'{src.label()!r} in metrics; give one of them another name = "..."'
            )
        labels[src.label()] = i


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (None values are left out: they mean 'from the preset')."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        tables: list[tuple[str, dict]] = []  # arrays of tables come after the plain keys
        if section == "data" and values["sources"]:
            del values["path"]  # a mixture reads only its sources (load_config refuses both)
        for k, v in values.items():
            if isinstance(v, list):
                tables += [(f"{section}.{k}", t) for t in v]
            elif v is not None:
                lines.append(_toml_pair(k, v))
        lines.append("")
        for name, table in tables:
            lines.append(f"[[{name}]]")
            lines += [_toml_pair(k, v) for k, v in table.items() if v is not None]
            lines.append("")
    return "\n".join(lines)


def _toml_pair(k: str, v: Any) -> str:
    if isinstance(v, bool):
        return f"{k} = {'true' if v else 'false'}"
    return f"{k} = {_toml_str(v) if isinstance(v, str) else repr(v)}"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass, read from its source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                docs[prev.target.id] = node.value.value  # type: ignore[attr-defined]
    return docs


# ---------------------------------------------------------------------------------------------
# Validation: every cross-field rule, in one place.


def split_config_args(rest: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.toml] [--section.field=value ...]` -> (the file or None, the overrides): the
    arguments `triaxis train` and `triaxis launch` pass on."""
    if rest and not rest[0].startswith("--"):
        return rest[0], rest[1:]
    return None, rest


def validate(cfg: Config, model_args=None, dims=None) -> None:
    """Raise UserError naming the value, the rule and the fix. `model_args` and `dims` (the
    resolved model shape and parallel degrees) enable the rules that need them."""
    check_config(cfg)
    t, d, p = cfg.train, cfg.data, cfg.parallel
    if cfg.checkpoint.resume not in ("auto", "none"):
        raise UserError(f"checkpoint.resume={cfg.checkpoint.resume!r}: use auto or none")
    if p.loss_parallel and p.tp == 1:
        raise UserError(
            "parallel.loss_parallel=true needs parallel.tp > 1; set tp or drop loss_parallel"
        )
    if p.activation_offload and (
        p.activation_checkpoint == "none"
        or (p.activation_checkpoint == "selective" and p.ac_selective == "op")
    ):
        raise UserError(
            f"parallel.activation_offload=true offloads the inputs checkpointed blocks save, "
            f"but activation_checkpoint={p.activation_checkpoint!r}"
            + (
                f" with ac_selective={p.ac_selective!r}"
                if p.activation_checkpoint != "none"
                else ""
            )
            + " checkpoints no whole block; set parallel.activation_checkpoint=full or drop "
            "activation_offload"
        )
    if d.mean_document_tokens and not d.document_mask:
        raise UserError(
            f"data.mean_document_tokens={d.mean_document_tokens} counts masked attention "
            "FLOPs, but data.document_mask=false; set --data.document_mask=true or drop it"
        )
    if model_args is not None and d.seq_len > model_args.max_seq_len:
        raise UserError(
            f"data.seq_len={d.seq_len} is over the model's maximum "
            f"max_seq_len={model_args.max_seq_len}; lower data.seq_len or raise "
            f"--model.max_seq_len"
        )
    if dims is not None:
        if model_args is not None:
            dims.check_model(model_args.n_heads, model_args.n_kv_heads, model_args.n_layers)
        per_step = t.micro_batch * dims.dp_size
        if t.global_batch % per_step:
            ok = t.global_batch // per_step * per_step or per_step
            raise UserError(
                f"train.global_batch={t.global_batch} is not a multiple of micro_batch x dp = "
                f"{t.micro_batch} x {dims.dp_size} = {per_step}; set train.global_batch={ok} "
                f"or a smaller train.micro_batch"
            )


def attention_span(d: DataConfig) -> int:
    """Keys per query that attention FLOPs count: the window, or with document masking the
    expected document length (data.mean_document_tokens) when it is shorter."""
    if d.document_mask and d.mean_document_tokens:
        return min(d.seq_len, d.mean_document_tokens)
    return d.seq_len


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    return cfg.train.global_batch // (cfg.train.micro_batch * dp_size)
