"""The training loop: forward, backward, step, validate, checkpoint, log, in plain sight.

config -> ParallelDims + mesh -> model on meta -> parallelize -> materialize + init
-> optimizer -> resume -> loop
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from triaxis.checkpoint.dcp import Checkpointer
from triaxis.config import Config, grad_accum_steps, to_toml
from triaxis.data.dataset import (
    SYNTHETIC,
    EmptySplitError,
    TokenDataset,
    has_loss_mask,
    inputs_targets,
    micro_batch_start,
)
from triaxis.metrics.logger import MetricsWriter, Progress, RankLogger, peak_flops
from triaxis.model import flops_per_token, param_counts
from triaxis.model.loss import IGNORE_INDEX
from triaxis.parallel.parallelize import set_grad_sync
from triaxis.parallel.rules import Planner
from triaxis.train.build import build_model
from triaxis.train.distributed import DistEnv, init_distributed, leave_on_error, shutdown
from triaxis.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from triaxis.train.resilience import (
    Faults,
    NumericsGuard,
    PreemptionWatch,
    hold_run_lock,
    lock_folders,
)
from triaxis.train.resolve import resolve
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


def run(cfg: Config, planner: Planner | None = None) -> TrainResult:
    """Train per `cfg`, in this process (joining the process group torchrun describes).
    `planner` chooses the layout for parallel.auto (the command line passes the planner's)."""
    env = init_distributed(cfg.train.device, need_group=cfg.parallel.fsdp_always)
    try:
        trainer = Trainer(cfg, env, planner)  # checks the config and data, writes nothing
        # Before the first write (resume may remove a partial checkpoint): one run per folder.
        with hold_run_lock(lock_folders(cfg.checkpoint_dir(), cfg.train.run_dir), env.is_main):
            return trainer.fit()
    except BaseException as err:
        leave_on_error(env, err)  # a rank of a job exits here, skipping the barrier below
        raise
    finally:
        shutdown(env)


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
        try:
            self.val_ds = (
                None
                if cfg.data.path == SYNTHETIC
                else TokenDataset(
                    cfg.data.path,
                    "val",
                    cfg.data.seq_len,
                    cfg.data.seed,
                    cache_dir=cfg.data.cache_dir,
                    cache_gib=cfg.data.cache_gib,
                    verify=cfg.data.verify,
                )
            )
        except EmptySplitError as e:  # a damaged val shard is an error, not "no validation"
            self.val_ds = None
            if cfg.train.val_every:
                self.log.warn(f"no validation: {e}")
        self.grad_accum = grad_accum_steps(cfg, self.dims.dp_size)
        self.device = env.device
        self.compute_dtype = _compute_dtype(cfg.train.dtype, self.device)

        self.mesh, self.dp_mesh = (
            self.dims.build_mesh(self.device.type)
            if env.world_size > 1 or self.dims.fsdp_enabled
            else (None, None)
        )
        self.dp_rank = self.dims.dp_rank(env.rank)
        self.dp_group = self.dp_mesh.get_group() if self.dp_mesh is not None else None

        # Under FSDP, bf16 compute comes from its mixed-precision policy instead of autocast.
        mp = self.compute_dtype if self.dims.fsdp_enabled else None
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
        layout = {
            "world_size": env.world_size,
            **dict(zip(("pp", "dp_replicate", "dp_shard", "tp"), self.dims.shape)),
        }
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
            {"data_path": cfg.data.path, "config": to_toml(cfg)},
            self.log,
        )
        self.ckpt_step = 0
        self.resumed_loop_state: dict = {}  # see loop_state()
        self.guard: NumericsGuard | None = None
        self.skip_cursors: set[int] = set()
        self.flops_per_token = flops_per_token(self.model_args, cfg.data.seq_len)
        self.peak = peak_flops(self.device)
        # Loss-masked data (prepare --format chat): each micro-batch's loss is its summed token
        # losses x this, set per step (`_masked_scale`) so the step's loss is the mean over the
        # valid targets of the whole global batch, whatever the layout.
        self.masked_loss = has_loss_mask(self.train_ds)
        self.loss_scale: torch.Tensor | None = None

    # -- one optimizer step ------------------------------------------------------------------
    def autocast(self):
        if self.compute_dtype is None or self.dims.fsdp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = logits.flatten(0, 1).float(), targets.flatten()  # -100 targets are skipped
        if self.loss_scale is None:
            return F.cross_entropy(*flat)
        return _plain(F.cross_entropy(*flat, reduction="sum")) * self.loss_scale

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a micro-batch (with a loss mask: its share of the global
        batch's mean, see loss_scale): the fused, chunked head + loss where the head is whole
        on this rank (triaxis.model.loss), else full logits, then the loss."""
        if self.loss_chunk:
            with self.autocast():
                loss = self.model(inputs, targets=targets, loss_chunk=self.loss_chunk)
            if self.loss_scale is None:
                return loss
            return loss * (targets != IGNORE_INDEX).sum() * self.loss_scale  # the sum, scaled
        with self.autocast():
            logits = self.model(inputs)
        return self.loss_fn(logits, targets)

    def local_batch(self, ds, cursor: int, micro_step: int, shuffle: bool = True):
        """This rank's (inputs, targets) of one micro-step, on the device."""
        start = micro_batch_start(
            cursor, micro_step, self.cfg.train.micro_batch, self.dims.dp_size, self.dp_rank
        )
        t0 = time.perf_counter()
        inputs, targets = inputs_targets(ds, start, self.cfg.train.micro_batch, shuffle)
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
        return (self.dims.dp_size * micro / count.clamp(min=1).double()).float()

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
        if self.pipeline is not None:
            # The schedule runs the micro-batches: hand it all of them, in micro-step order.
            inputs, targets = (torch.cat(t) for t in zip(*batches))
            with self.loss_parallel(), self.autocast():
                return self.pipeline.step(inputs, targets)
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
            total += _plain(loss.detach())
        return total

    def optimizer_step(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip_grad_norm(params, self.cfg.train.grad_clip, self.pp_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def train_step(self, cursor: int, step: int = 0) -> tuple[torch.Tensor, str | None]:
        """One training step, the one fit() runs: forward + backward, the numerics guard's
        verdict, then the optimizer step. Returns (this rank's loss, None), or (loss, why) for
        a bad loss: no update was made and the gradients are dropped."""
        self.faults.inject_kill(step, self.env.rank)
        loss = self.forward_backward(cursor, step)
        if self.guard is not None:
            reason = self.guard.check(self.mean_over_dp(loss), step, cursor)
            if reason is not None:
                self.optimizer.zero_grad(set_to_none=True)
                return loss, reason
        self.optimizer_step()
        return loss, None

    def mean_over_dp(self, value: torch.Tensor) -> float:
        if self.dp_group is not None:
            value = value.clone()
            dist.all_reduce(value, group=self.dp_group)
            value /= self.dims.dp_size
        return float(value)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss over the first val_batches x global_batch validation samples, in order;
        the same samples and value for every layout."""
        if self.val_ds is None or self.cfg.train.val_batches == 0:
            return None
        self.faults.inject_fault("validation", self.env.rank)
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for v in range(self.cfg.train.val_batches):
            cursor = v * self.cfg.train.global_batch
            batches = [
                self.local_batch(self.val_ds, cursor, m, shuffle=False)
                for m in range(self.grad_accum)
            ]
            self.loss_scale = self._masked_scale(batches)
            if self.loss_scale is not None:  # the mean of each global batch, then of those
                self.loss_scale = self.loss_scale / self.cfg.train.val_batches
            with self.loss_parallel(), self.autocast():
                if self.pipeline is not None:
                    total += self.pipeline.eval(*(torch.cat(t) for t in zip(*batches)))
                    continue
                for inputs, targets in batches:
                    total += _plain(self.loss_of(inputs, targets))
        self.model.train()
        n = self.cfg.train.val_batches * (1 if self.pipeline is not None else self.grad_accum)
        if self.loss_scale is not None:
            n = 1  # already a mean: the scale divided by the valid targets
        self.loss_scale = None
        return self.mean_over_dp(total / n)

    # -- the loop ----------------------------------------------------------------------------
    def resume(self) -> tuple[int, int]:
        """(step, cursor) to start from: the latest valid checkpoint, else checkpoint.initial's
        weights at step 0, else a fresh start."""
        cfg = self.cfg
        resumed = self.ckpt.resume(cfg.checkpoint.resume)
        if resumed is not None:
            found, state = resumed
            self.log.info(
                f"resumed from {found.path} at step {state['step']} "
                f"(sample cursor {state['cursor']})"
            )
            self.resumed_loop_state = state.get("loop_state", {})
            return state["step"], state["cursor"]
        if cfg.checkpoint.initial:
            self.ckpt.load_initial(cfg.checkpoint.initial)
            self.log.info(f"initial weights from {cfg.checkpoint.initial}")
        return 0, 0

    def fit(self) -> TrainResult:
        cfg, log = self.cfg, self.log
        self.faults.inject_fault("start", self.env.rank)
        step, cursor = self.resume()
        first_step = step
        run_dir = Path(cfg.train.run_dir)
        if self.env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(to_toml(cfg))
        counts = param_counts(self.model_args)
        log.info(
            f"model {cfg.model.preset}: {counts['total'] / 1e6:.1f}M parameters "
            f"({counts['non_embedding'] / 1e6:.1f}M non-embedding); layout "
            f"{self.dims.describe()} on {self.env.world_size} x {self.device.type}; "
            f"global batch {cfg.train.global_batch} x {cfg.data.seq_len} tokens, "
            f"grad accumulation {self.grad_accum}; loss: "
            + (
                f"fused head + cross-entropy, {self.loss_chunk} tokens a chunk"
                if self.loss_chunk
                else "full logits, then cross-entropy"
            )
        )
        metrics = MetricsWriter(cfg.train.run_dir, self.env.is_main, cfg.metrics.tensorboard)
        progress = Progress(log, cfg.train.steps, step, cfg.metrics.progress)
        result = TrainResult(run_dir=str(run_dir))
        preempt = PreemptionWatch()
        self.guard = (
            NumericsGuard(cfg.train.spike_factor, cfg.train.max_bad_steps)
            if cfg.train.on_bad_loss != "off"
            else None
        )
        self.skip_cursors = set()  # batches a rollback decided never to train on again
        self.restore_loop_state(self.resumed_loop_state)
        tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        t_last, steps_since = time.perf_counter(), 0
        watchdog = Watchdog(cfg.train.hang_timeout_s, self.env.rank, self.env.world_size)
        watchdog.start()
        try:
            while step < cfg.train.steps:
                watchdog.beat(step)  # once per iteration: a step, its logging, validation, save
                if cursor in self.skip_cursors:
                    cursor += cfg.train.global_batch
                    continue
                loss, reason = self.train_step(cursor, step + 1)
                if reason is not None:
                    step, cursor = self._bad_step(reason, step, cursor, self.skip_cursors)
                    continue
                step += 1
                cursor += cfg.train.global_batch
                steps_since += 1
                if self.ckpt.poll():
                    log.info(f"committed checkpoint at step {self.ckpt_step}")
                if (
                    step % cfg.metrics.log_every == 0
                    or step == cfg.train.steps
                    or step == first_step + 1
                ):  # the starting loss, to see it fall
                    record = self._record(
                        step, loss, tokens_per_step * steps_since, time.perf_counter() - t_last
                    )
                    result.losses[step] = record["loss"]
                    metrics.write(record)
                    progress.update(step, record)
                    t_last, steps_since = time.perf_counter(), 0
                if cfg.train.val_every and step % cfg.train.val_every == 0:
                    val = self.validate()
                    if val is not None:
                        result.val_losses[step] = val
                        metrics.write({"step": step, "val_loss": val})
                        log.info(f"step {step}: validation loss {val:.4f}")
                    t_last = time.perf_counter()  # validation time is not training time
                last = step == cfg.train.steps
                if (
                    cfg.train.exit_after_steps
                    and step - first_step >= cfg.train.exit_after_steps
                    and not last
                ):
                    self.ckpt.save(step, cursor, block=True, loop_state=self.loop_state())
                    log.info(f"exit_after_steps={cfg.train.exit_after_steps}: saved step {step}")
                    break
                if preempt.should_stop() and not last:
                    self.ckpt.save(step, cursor, block=True, loop_state=self.loop_state())
                    log.warn(f"{preempt.name}: saved a final checkpoint at step {step}; exiting")
                    result.preempted, result.stop_signal = True, preempt.signal
                    break
                if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or (
                    last and cfg.checkpoint.save_final
                ):
                    self.faults.inject_fault("checkpoint", self.env.rank, step)
                    path = self.ckpt.save(step, cursor, block=last, loop_state=self.loop_state())
                    self.ckpt_step = step
                    blocked = self.ckpt.blocking_s[-1]
                    log.info(f"checkpoint {path} (training blocked {blocked:.2f}s)")
                    metrics.write({"step": step, "checkpoint_blocking_s": blocked})
                    t_last = time.perf_counter()  # checkpoint time is not training time
            self.ckpt.close()
        finally:
            watchdog.stop()
            preempt.close()
            progress.close()
            metrics.close()
        result.final_step = step
        return result

    def _bad_step(
        self, reason: str, step: int, cursor: int, skip_cursors: set[int]
    ) -> tuple[int, int]:
        """A bad loss: skip this update, or roll back to the last checkpoint and never train on
        this batch again. Returns the (step, cursor) to continue from."""
        skip_cursors.add(cursor)
        if self.cfg.train.on_bad_loss == "rollback":
            self.ckpt.wait()
            resumed = self.ckpt.resume()
            if resumed is not None:
                state = resumed[1]
                self.restore_loop_state(state.get("loop_state", {}), rollback=True)
                self.log.warn(
                    f"step {step + 1}: {reason}; rolled back to step {state['step']} "
                    f"and skipping the batch at sample cursor {cursor}"
                )
                return state["step"], state["cursor"]
            self.log.warn(f"step {step + 1}: {reason}; no checkpoint to roll back to, skipping")
        else:
            self.log.warn(
                f"step {step + 1}: {reason}; update skipped, batch at sample cursor "
                f"{cursor} dropped"
            )
        return step, cursor + self.cfg.train.global_batch

    # What the loop carries from step to step besides weights, optimizer, LR schedule and data
    # cursor (those are the checkpoint's own state): saved with every checkpoint, restored on
    # resume, so a killed and resumed run repeats the uninterrupted one exactly. Nothing else
    # carries over: no step draws random numbers (the data order is a pure function of seed and
    # position; there is no dropout), and the pipeline schedules start every step afresh.
    def loop_state(self) -> dict:
        state: dict = {"skip_cursors": sorted(self.skip_cursors)}
        if self.guard is not None:
            state["guard"] = {
                "seen": self.guard.seen,
                "mean": self.guard.mean,
                "bad_steps": self.guard.bad_steps,
            }
        return state

    def restore_loop_state(self, state: dict, rollback: bool = False) -> None:
        """After a resume; or after a rollback, which returns the running mean to the
        checkpoint's but keeps counting bad steps (else max_bad_steps could never stop a run
        that keeps rolling back) and keeps every batch already marked to skip."""
        self.skip_cursors |= set(state.get("skip_cursors", ()))
        guard = state.get("guard")
        if self.guard is not None and guard is not None:
            self.guard.seen, self.guard.mean = int(guard["seen"]), float(guard["mean"])
            if not rollback:
                self.guard.bad_steps = int(guard["bad_steps"])

    def _record(self, step: int, loss: torch.Tensor, tokens: int, elapsed_s: float) -> dict:
        tokens_per_s = tokens / max(elapsed_s, 1e-9)
        per_device = tokens_per_s / self.env.world_size
        mfu = (self.flops_per_token * per_device / self.peak) if self.peak else None
        mem = torch.tensor([_peak_memory_bytes(self.device)], dtype=torch.float64)
        wait = torch.tensor([self.data_wait_s], dtype=torch.float64)
        self.data_wait_s = 0.0
        self.faults.inject_fault("logging", self.env.rank, step)
        if self.env.world_size > 1:
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
            dist.all_reduce(wait, op=dist.ReduceOp.MAX)  # the slowest rank's wait stalls all
        steps = max(1, round(tokens / (self.cfg.train.global_batch * self.cfg.data.seq_len)))
        wait_share = float(wait) / max(elapsed_s, 1e-9)
        if wait_share > 0.1:
            self.log.warn(
                f"step {step}: the data loader stalls training: {wait_share:.0%} of "
                f"step time waiting for batches ({float(wait) / steps:.3f}s per step); "
                "put data.path on faster storage or raise data.cache_gib (s3://)"
            )
        return {
            "step": step,
            "loss": self.mean_over_dp(loss),
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "mfu": mfu,
            "max_memory_gib": float(mem) / 2**30,
            "data_wait_s": float(wait) / steps,
            "data_wait_share": wait_share,
        }


def _compute_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. bf16 = autocast (one process) or FSDP's mixed-precision policy."""
    if requested == "bf16" or (requested == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A loss from loss_parallel is a replicated DTensor; its local value is the full loss."""
    return t.to_local() if hasattr(t, "to_local") else t
