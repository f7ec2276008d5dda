"""Rank-aware console output, metrics.jsonl, TensorBoard, and MFU.

Only rank 0 prints and writes; every other rank's logger is silent. Values arrive here already
reduced across ranks (the training loop does the collectives).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console

from triaxis.hardware import peak_bf16_flops
from triaxis.metrics.trackers import open_trackers


def peak_flops(device) -> float | None:
    """The card's dense bf16 peak (from hardware.toml), or None on CPU (no meaningful MFU there)
    and on a card hardware.toml does not list."""
    if device.type != "cuda":
        return None
    import torch

    return peak_bf16_flops(torch.cuda.get_device_name(device))


def mixed_peak_flops(
    bf16_peak: float, fp8_peak: float, flops_per_token: float, fp8_flops_per_token: float
) -> float:
    """The peak a float8 run could reach: its FP8 GEMMs at the FP8 peak, the rest at bf16's
    (the time per token at peak, inverted). MFU against it says how close the run is to what
    its own mix of GEMMs allows; MFU against bf16's peak stays comparable with bf16 runs."""
    rest = flops_per_token - fp8_flops_per_token
    return flops_per_token / (fp8_flops_per_token / fp8_peak + rest / bf16_peak)


def peak_memory_bytes(device) -> int:
    """The most memory this process has held: allocated on the GPU, else resident (Linux)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_memory(device, log: RankLogger) -> None:
    """Restart peak_memory_bytes from what is held now (metrics.reset_peak_memory_after); says
    so where that is impossible (a process's resident peak on CPU)."""
    if device.type != "cuda":
        log.info("metrics.reset_peak_memory_after: a CPU process's peak cannot be reset")
        return
    import torch

    torch.cuda.reset_peak_memory_stats(device)


def describe_run(cfg, counts: dict, where: str, grad_accum: int, loss_chunk: int) -> str:
    """The line a run starts with: the model, the layout (`where`: the layout and the devices),
    the batch, the loss path."""
    return (
        f"model {cfg.model.preset}: {counts['total'] / 1e6:.1f}M parameters "
        f"({counts['non_embedding'] / 1e6:.1f}M non-embedding); layout "
        f"{where}; "
        f"global batch {cfg.train.global_batch} x {cfg.data.seq_len} tokens, "
        f"grad accumulation {grad_accum}; loss: "
        + (
            f"fused head + cross-entropy, {loss_chunk} tokens a chunk"
            if loss_chunk
            else "full logits, then cross-entropy"
        )
    )


def step_record(
    step: int,
    *,
    loss: float,
    lr: float,
    tokens: int,
    steps: int,
    elapsed_s: float,
    world_size: int,
    flops_per_token: float,
    peak: float | None,
    max_memory_bytes: float,
    data_wait_s: float,
) -> tuple[dict, str | None]:
    """The record of a logged step, over the `steps` steps (`tokens` tokens, `elapsed_s`) since
    the last one, from values already reduced across ranks; and a warning when waiting for
    data took over a tenth of that time."""
    tokens_per_s = tokens / max(elapsed_s, 1e-9)
    per_device = tokens_per_s / world_size
    wait_share = data_wait_s / max(elapsed_s, 1e-9)
    steps = max(1, steps)
    stall = None
    if wait_share > 0.1:
        stall = (
            f"step {step}: the data loader stalls training: {wait_share:.0%} of "
            f"step time waiting for batches ({data_wait_s / steps:.3f}s per step); "
            "put data.path on faster storage or raise data.cache_gib (s3://)"
        )
    record = {
        "step": step,
        "loss": loss,
        "lr": lr,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": per_device,
        "mfu": (flops_per_token * per_device / peak) if peak else None,
        "max_memory_gib": max_memory_bytes / 2**30,
        "data_wait_s": data_wait_s / steps,
        "data_wait_share": wait_share,
    }
    return record, stall


class RankLogger:
    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)

    def info(self, msg: str) -> None:
        if self.is_main:
            self.console.print(msg, markup=False)

    def warn(self, msg: str) -> None:
        if self.is_main:
            self.console.print(f"warning: {msg}", style="yellow", markup=False)


class MetricsWriter:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl, mirrors to TensorBoard
    and to the trackers `cfg.metrics` asks for (MLflow, W&B: trackers.py)."""

    def __init__(self, run_dir: str, is_main: bool, tensorboard: bool, cfg=None, warn=None):
        self.is_main = is_main
        self.tb = None
        self.trackers = []
        if not is_main:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        if cfg is not None:
            self.trackers = open_trackers(cfg, run_dir, warn)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
        for tracker in self.trackers:  # queued: sent by a background thread
            tracker.log(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()


class Progress:
    """A live bar on a terminal (step, loss, tokens/s, MFU, ETA), plain lines elsewhere."""

    def __init__(self, logger: RankLogger, total_steps: int, start_step: int, enabled: bool):
        self.logger = logger
        self.live = enabled and logger.is_main and sys.stdout.isatty()
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self.bar = None
        if self.live:
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=logger.console,
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def update(self, step: int, record: dict) -> None:
        mfu = f" mfu {record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else ""
        info = (
            f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu}"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
            return
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        self.logger.info(f"step {step:>6}/{self.total}  {info}  eta {eta:,.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
