"""The training loop: forward, backward, step, validate, checkpoint, log, in plain sight.

config -> ParallelDims + mesh -> model on meta -> parallelize -> materialize + init
-> optimizer -> resume -> loop
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from triaxis.checkpoint.assets import carried_files
from triaxis.checkpoint.dcp import Checkpointer
from triaxis.checkpoint.memory_save import MemoryTier
from triaxis.config import Config, attention_span, grad_accum_steps, to_toml
from triaxis.data import mixture
from triaxis.data.dataset import has_loss_mask, inputs_targets, micro_batch_start
from triaxis.data.mixture import open_val_sets, source_tokens
from triaxis.metrics.logger import (
    MetricsWriter,
    Progress,
    RankLogger,
    describe_run,
    peak_flops,
    reset_peak_memory,
)
from triaxis.model import flops_per_token, param_counts
from triaxis.model.attention import document_ids
from triaxis.model.loss import IGNORE_INDEX
from triaxis.model.moe import update_expert_bias
from triaxis.parallel.context import cp_rows
from triaxis.parallel.float8 import float8_step_hook
from triaxis.parallel.host import new_host_group
from triaxis.parallel.parallelize import set_grad_sync
from triaxis.parallel.pipeline import local_value
from triaxis.parallel.rules import Planner
from triaxis.train.build import build_model, compute_dtype
from triaxis.train.cadence import Cadence
from triaxis.train.distributed import DistEnv, staged_for_copy
from triaxis.train.numerics import Numerics
from triaxis.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from triaxis.train.padding import padding_positions
from triaxis.train.profile import StepProfiler
from triaxis.train.record import float8_peak, log_record
from triaxis.train.resilience import Faults, PreemptionWatch
from triaxis.train.resolve import recorded_data_path, resolve
from triaxis.train.restart import restored_state
from triaxis.train.stepstats import StepStats
from triaxis.train.validation import validate_all
from triaxis.train.watchdog import Watchdog


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Global training loss per logged step."""
    val_losses: dict[int, float] = field(default_factory=dict)
    final_step: int = 0
    run_dir: str = ""
    preempted: bool = False
    """True when SIGTERM or Ctrl-C ended the run early (after a final checkpoint)."""
    stop_signal: int = 0
    """The signal that ended it (the exit status is 128 + this: 143, 130)."""


class Trainer:
    data_wait_s: float = 0.0
    """Seconds spent fetching training batches since the last logged record."""

    def __init__(self, cfg: Config, env: DistEnv, planner: Planner | None = None):
        # With parallel.auto, resolve returns a new config holding the planner's layout.
        cfg, self.dims, self.model_args, self.train_ds, why = resolve(cfg, env.world_size, planner)
        self.cfg, self.env = cfg, env
        self.faults = Faults()  # test fault injection: parsed once, here
        self.log = RankLogger(env.is_main)
        if why:
            self.log.info(why)
        # {"": data.path's val split} or {source name: its val split} for a mixture
        self.val_sets = open_val_sets(cfg, self.log.warn if cfg.train.val_every else None)
        self.grad_accum = grad_accum_steps(cfg, self.dims.dp_size)
        self.device = env.device
        self.compute_dtype = compute_dtype(cfg.train.dtype, self.device)

        self.mesh, self.dp_mesh = (
            self.dims.build_mesh(self.device.type)
            if env.world_size > 1 or self.dims.fsdp_enabled
            else (None, None)
        )
        self.dp_rank = self.dims.dp_rank(env.rank)
        self.dp_group = self.dp_mesh.get_group() if self.dp_mesh is not None else None
        # Host values (log records, the preemption flag) cross ranks over this gloo group: on
        # GPUs the mesh groups are NCCL's, which serve device tensors only (parallel/host.py).
        self.host_group = new_host_group() if env.world_size > 1 else None

        # Under FSDP, bf16 compute comes from its mixed-precision policy instead of autocast
        # (unless parallel.fsdp_autocast asks for the single-process numerics).
        mp = self.compute_dtype if self._fsdp_policy() else None
        self.model, self.pipeline = build_model(
            cfg,
            self.model_args,
            self.dims,
            self.mesh,
            self.device,
            mp,
            self.grad_accum,
            self.loss_fn,
            self.log,
        )
        self.pp_group = self.mesh["pp"].get_group() if self.pipeline is not None else None
        # The fused head + loss needs the whole head on this rank and the loss in the model's
        # forward: not with a vocabulary-sharded head (tp) or a pipeline's own loss (pp).
        whole_head = self.pipeline is None and self.dims.tp == 1
        self.loss_chunk = cfg.train.loss_chunk_tokens if whole_head else 0
        self.optimizer = build_optimizer(
            self.model, cfg.train, self.device, params_on_cpu=cfg.parallel.cpu_offload
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.float8_scales = float8_step_hook(cfg.train.float8, self.device, self.dims.dp_shard)
        layout = {
            "world_size": env.world_size,
            **dict(zip(("pp", "dp_replicate", "dp_shard", "cp", "tp"), self.dims.shape)),
        }
        tok_info = self.train_ds.manifest["tokenizer"]
        self.ckpt = Checkpointer(
            cfg.checkpoint_dir(),
            self.model,
            self.optimizer,
            self.scheduler,
            self.model_args,
            layout,
            cfg.checkpoint,
            env.rank,
            env.world_size,
            {"data_path": recorded_data_path(cfg), "config": to_toml(cfg), "tokenizer": tok_info},
            self.log,
            asset_files=carried_files(cfg, tok_info, self.model_args) if env.rank == 0 else None,
        )
        self.ckpt_step = 0
        self.memory = MemoryTier.of(cfg, self.ckpt, env.rank, self.host_group, self.log)
        self.resumed_loop_state: dict = {}  # see loop_state()
        self.numerics = Numerics(cfg.train, self.log, on=False)  # fit() turns it on
        self.flops_per_token = flops_per_token(self.model_args, attention_span(cfg.data))
        # Document masking: the EOS id that ends each document of a packed window (None = off).
        self.eos_id = (
            self.train_ds.manifest["tokenizer"]["eos_id"] if cfg.data.document_mask else None
        )
        self.peak = peak_flops(self.device)
        # Packed windows end in padding (end-of-document tokens, masked): counted on the device.
        packed = getattr(self.train_ds, "packed", False)
        self.pad_eos = self.train_ds.manifest["tokenizer"].get("eos_id") if packed else None
        self.pad_positions = torch.zeros((), dtype=torch.int64, device=self.device)
        self.peak_float8 = float8_peak(
            cfg.train, self.model_args, self.device, self.flops_per_token
        )
        # Loss-masked data (prepare --format chat): each micro-batch's loss is its summed token
        # losses x this, set per step (`_masked_scale`) so the step's loss is the mean over the
        # valid targets of the whole global batch, whatever the layout.
        self.masked_loss = has_loss_mask(self.train_ds)
        self.loss_scale: torch.Tensor | None = None
        self.stats = StepStats(self.device, cfg.train.grad_clip)  # grad norm, step times

    # -- one optimizer step ------------------------------------------------------------------
    def _fsdp_policy(self) -> bool:
        """Whether FSDP's mixed-precision policy (not autocast) gives the bf16 compute."""
        return self.dims.fsdp_enabled and not self.cfg.parallel.fsdp_autocast

    def autocast(self):
        if self.compute_dtype is None or self._fsdp_policy():
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = logits.flatten(0, 1).float(), targets.flatten()  # -100 targets are skipped
        if self.loss_scale is None:
            return F.cross_entropy(*flat)
        return local_value(F.cross_entropy(*flat, reduction="sum")) * self.loss_scale

    def doc_ids(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Document index of each input token with data.document_mask, else None."""
        return None if self.eos_id is None else document_ids(inputs, self.eos_id)

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a micro-batch (with a loss mask: its share of the global
        batch's mean, see loss_scale): the fused, chunked head + loss where the head is whole
        on this rank (triaxis.model.loss), else full logits, then the loss."""
        inputs, targets, doc_ids = cp_rows(self.model, inputs, targets, self.doc_ids(inputs))
        if self.loss_chunk:
            with self.autocast():
                loss = self.model(
                    inputs, targets=targets, loss_chunk=self.loss_chunk, doc_ids=doc_ids
                )
            if self.loss_scale is None:
                return loss
            return loss * (targets != IGNORE_INDEX).sum() * self.loss_scale  # the sum, scaled
        with self.autocast():
            logits = self.model(inputs, doc_ids=doc_ids)
        return self.loss_fn(logits, targets)

    def local_batch(self, ds, cursor: int, micro_step: int, shuffle: bool = True):
        """This rank's (inputs, targets) of one micro-step, on the device."""
        start = micro_batch_start(
            cursor, micro_step, self.cfg.train.micro_batch, self.dims.dp_size, self.dp_rank
        )
        t0 = time.perf_counter()
        inputs, targets = inputs_targets(ds, start, self.cfg.train.micro_batch, shuffle)
        if self.device.type == "cuda":  # a copy from pinned memory does not wait for the GPU
            inputs, targets = staged_for_copy(inputs, True), staged_for_copy(targets, True)
        if ds is self.train_ds:  # validation reads are not training time
            self.data_wait_s += time.perf_counter() - t0
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def _masked_scale(self, batches: list) -> torch.Tensor | None:
        """For loss-masked data: data-parallel size / valid targets of the whole global batch
        (x micro-batches with a pipeline, whose schedule averages them). FSDP averages the
        gradients over the data-parallel ranks, so the summed token losses x this give the
        gradient of the global mean: the same numbers as one process. None without a mask
        (a split without one, validating a mixture's unmasked source, gets the same mean)."""
        if not self.masked_loss:
            return None
        count = sum((t != IGNORE_INDEX).sum() for _, t in batches)  # int64: exact
        if self.dp_group is not None:
            dist.all_reduce(count, group=self.dp_group)
        micro = len(batches) if self.pipeline is not None else 1
        ranks = self.dims.loss_ranks * self.dims.cp  # each cp rank counted the whole rows
        return (ranks * micro / count.clamp(min=1).double()).float()

    def loss_parallel(self):
        if not self.cfg.parallel.loss_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def forward_backward(self, cursor: int, step: int) -> torch.Tensor:
        """Forward + backward over grad_accum micro-batches; gradients left in .grad.
        Returns this rank's mean loss (a tensor: no host sync here)."""
        self.faults.inject_fault("forward", self.env.rank, step)
        if hasattr(self.train_ds, "prefetch"):  # s3:// shards of this step and the next
            self.train_ds.prefetch(
                cursor,
                2 * self.cfg.train.global_batch,
                self.cfg.train.micro_batch,
                self.dims.dp_size,
                self.dp_rank,
            )
        batches = [self.local_batch(self.train_ds, cursor, m) for m in range(self.grad_accum)]
        self.loss_scale = self._masked_scale(batches)
        if self.pad_eos is not None:  # packed data: its padding is not throughput
            self.pad_positions += sum(padding_positions(i, t, self.pad_eos) for i, t in batches)
        if self.pipeline is not None:
            # The schedule runs the micro-batches: hand it all of them, in micro-step order.
            inputs, targets = (torch.cat(t) for t in zip(*batches))
            with self.loss_parallel(), self.autocast():
                return self.pipeline.step(
                    *cp_rows(self.model, inputs, targets, self.doc_ids(inputs))
                )
        total = torch.zeros((), device=self.device)
        poison = self.faults.inject_nan(step)
        for m, (inputs, targets) in enumerate(batches):
            set_grad_sync(self.model, self.dims, last_micro_step=m == self.grad_accum - 1)
            with self.loss_parallel():
                loss = self.loss_of(inputs, targets)
                if self.loss_scale is None:
                    loss = loss / self.grad_accum
                if poison:
                    loss = loss * float("nan")
                loss.backward()
            total += local_value(loss.detach())
        return total

    def train_step(self, cursor: int, step: int = 0, logs: bool = False) -> torch.Tensor:
        """One training step, the one fit() runs: forward + backward, clipping, the update.
        Nothing is read on the host. With the numerics guard on (fit sets it), the update is a
        no-op on the device when the gradients are not finite, or on a log step when the mean
        loss is not finite or spikes; fit() learns of it at the next step that syncs anyway.
        Returns this rank's loss, or on a log step (`logs`) its mean over data-parallel ranks
        (a device tensor either way)."""
        self.faults.inject_kill(step, self.env.rank)
        with self.stats.phase("fwd_bwd"):
            loss = self.forward_backward(cursor, step)
        if logs:
            loss = self.reduce_over_dp(loss)
        params = [p for p in self.model.parameters() if p.grad is not None]
        # With CPU offload the gradients live on the host: clipping reduces on the device.
        host_grads = self.device if self.cfg.parallel.cpu_offload else None
        with self.stats.phase("optimizer"):
            norm = clip_grad_norm(params, self.cfg.train.grad_clip, self.pp_group, host_grads)
            flag = None  # the numerics guard's "skip this update" (device), when it is on
            if self.numerics.checks is not None:
                flag = self.numerics.checks.flag(step, cursor, norm, loss if logs else None)
                self.optimizer.found_inf = flag
            self.optimizer.step()
            if self.float8_scales is not None:
                self.float8_scales(self.model)
            rate = self.model_args.moe_bias_update_rate
            update_expert_bias(self.model, rate, self.dp_group, skip=flag)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # also after a skipped update: fit() rewinds it once it knows
        if logs:
            self.stats.grad(norm)
        return loss

    def reduce_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks, on the device (a collective, no host read)."""
        if self.dp_group is None:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self.dp_group)
        return value / self.dims.loss_ranks

    def mean_over_dp(self, value: torch.Tensor) -> float:
        return float(self.reduce_over_dp(value))

    # -- the loop ----------------------------------------------------------------------------
    def resume(self) -> tuple[int, int]:
        """(step, cursor) to start from: the memory tier, the latest valid checkpoint, else
        checkpoint.initial's weights at step 0, else a fresh start (train/restart.py)."""
        state = restored_state(self.cfg, self.ckpt, self.memory, self.log)
        if state is None:
            return 0, 0
        self.resumed_loop_state = state.get("loop_state", {})
        need = self.cfg.train.steps * self.cfg.train.global_batch
        mixture.resume_mixture(
            self.train_ds, self.resumed_loop_state, state["cursor"], need, self.log
        )
        return state["step"], state["cursor"]

    def fit(self) -> TrainResult:
        cfg, log = self.cfg, self.log
        self.faults.inject_fault("start", self.env.rank)
        profiler = StepProfiler(cfg.profile, self.device, cfg.train.run_dir, self.env.rank, log)
        step, cursor = self.resume()
        run_dir = Path(cfg.train.run_dir)
        if self.env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(to_toml(cfg))
        counts = param_counts(self.model_args)
        where = f"{self.dims.describe()} on {self.env.world_size} x {self.device.type}"
        log.info(describe_run(cfg, counts, where, self.grad_accum, self.loss_chunk))
        metrics = MetricsWriter(
            cfg.train.run_dir, self.env.is_main, cfg.metrics.tensorboard, cfg, log.warn
        )
        progress = Progress(log, cfg.train.steps, step, cfg.metrics.progress)
        result = TrainResult(run_dir=str(run_dir))
        cadence = Cadence.of(cfg, step, bool(self.val_sets))
        preempt = PreemptionWatch(self.host_group)
        self.numerics = Numerics(cfg.train, log)
        self.numerics.restore(self.resumed_loop_state)
        t_last, steps_since = time.perf_counter(), 0
        watchdog = Watchdog(
            cfg.train.hang_timeout_s, self.env.rank, self.env.world_size, cfg.train.run_dir
        )
        watchdog.start()
        try:
            while step < cfg.train.steps:
                watchdog.beat(step)  # once per iteration: a step, its logging, validation, save
                if cursor in self.numerics.skip_cursors:
                    cursor += cfg.train.global_batch
                    continue
                logs = cadence.logs(step + 1)
                profiler.before(step + 1)
                loss = self.train_step(cursor, step + 1, logs)
                step += 1
                profiler.after(step)
                cursor += cfg.train.global_batch
                steps_since += 1
                if step == cfg.metrics.reset_peak_memory_after:  # host-side: no device sync
                    reset_peak_memory(self.device, log)
                stop = preempt.should_stop()  # non-blocking; the same answer on every rank
                if not (stop or cadence.syncs(step)):
                    continue  # the hot path: the host queues the next step at once
                # From here on the host reads device values (once): steps that sync anyway.
                logged, bad = self.numerics.settle()
                if bad:
                    step, cursor = self.numerics.handle(
                        bad, step, cursor, self.ckpt, self.scheduler
                    )
                    continue
                if self.memory is not None and self.memory.due(step):
                    took = self.memory.save(step, cursor, self.loop_state())
                    metrics.write({"step": step, "memory_checkpoint_s": took})
                if self.ckpt.poll():
                    log.info(f"committed checkpoint at step {self.ckpt_step}")
                if logs:
                    value = float(loss) if logged is None else logged  # the mean over dp
                    elapsed_s = time.perf_counter() - t_last  # after the read: the device's time
                    record = log_record(self, step, value, steps_since, elapsed_s)
                    result.losses[step] = record["loss"]
                    # per source of a mixture, from the cursor alone (host arithmetic)
                    record.update(
                        source_tokens(
                            self.train_ds,
                            cursor,
                            self.numerics.skip_cursors,
                            cfg.train.global_batch,
                        )
                    )
                    metrics.write(record)
                    progress.update(step, record)
                    t_last, steps_since = time.perf_counter(), 0
                if cadence.validates(step):
                    vals = validate_all(self)
                    if vals:
                        val = result.val_losses[step] = vals["val_loss"]
                        metrics.write({"step": step, **vals})
                        log.info(f"step {step}: validation loss {val:.4f}")
                    t_last = time.perf_counter()  # validation time is not training time
                if cadence.exits(step):
                    self.ckpt.save(step, cursor, block=True, loop_state=self.loop_state())
                    log.info(f"exit_after_steps={cfg.train.exit_after_steps}: saved step {step}")
                    break
                if stop and step < cfg.train.steps:
                    self.ckpt.save(step, cursor, block=True, loop_state=self.loop_state())
                    log.warn(f"{preempt.name}: saved a final checkpoint at step {step}; exiting")
                    result.preempted, result.stop_signal = True, preempt.signal
                    break
                if cadence.saves(step):
                    self.faults.inject_fault("checkpoint", self.env.rank, step)
                    last = step == cfg.train.steps
                    path = self.ckpt.save(step, cursor, block=last, loop_state=self.loop_state())
                    self.ckpt_step = step
                    blocked = self.ckpt.blocking_s[-1]
                    log.info(f"checkpoint {path} (training blocked {blocked:.2f}s)")
                    metrics.write({"step": step, "checkpoint_blocking_s": blocked})
                    t_last = time.perf_counter()  # checkpoint time is not training time
            preempt.finish()
            self.ckpt.close()
        finally:
            profiler.close()
            watchdog.stop()
            preempt.close()
            progress.close()
            metrics.close()
        result.final_step = step
        return result

    def loop_state(self) -> dict:
        """What the loop carries besides the checkpoint's own state (Numerics.state, and a
        mixture's weight history)."""
        return {**self.numerics.state(), **mixture.mixture_state(self.train_ds)}
