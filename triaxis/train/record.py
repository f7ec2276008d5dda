"""A logged step's record: what metrics.jsonl, the progress line and TensorBoard get on a log
step, gathered from the trainer's device values and host counters (one host reduction)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from triaxis.hardware import peak_bf16_flops, peak_fp8_flops
from triaxis.metrics.logger import mixed_peak_flops, peak_memory_bytes, step_record
from triaxis.model.moe import moe_record
from triaxis.parallel.float8 import converted_flops_per_token
from triaxis.parallel.host import host_all_reduce

if TYPE_CHECKING:  # the loop imports this module, not the reverse
    from triaxis.train.loop import Trainer


def log_record(t: Trainer, step: int, loss: float, steps: int, elapsed_s: float) -> dict:
    """A logged step's record for trainer `t`, over the `steps` steps since the last; all
    ranks reduce."""
    # Two host numbers, read on the host: the host group (no trip to the device and back).
    # The slowest rank's data wait stalls all, hence MAX for all (the step-time breakdown too).
    times = t.stats.read(steps, t.data_wait_s)
    mem_wait = torch.tensor(
        [peak_memory_bytes(t.device), t.data_wait_s, *times.values()],
        dtype=torch.float64,
    )
    t.data_wait_s = 0.0
    t.faults.inject_fault("logging", t.env.rank, step)
    if t.host_group is not None:
        host_all_reduce(mem_wait, t.host_group, op=dist.ReduceOp.MAX)
    mem, wait, *slowest = mem_wait.tolist()
    positions = steps * t.cfg.train.global_batch * t.cfg.data.seq_len
    padding = _padding(t)
    record, stall = step_record(
        step,
        loss=loss,
        lr=t.optimizer.param_groups[0]["lr"],
        tokens=positions - (padding or 0),
        steps=steps,
        elapsed_s=elapsed_s,
        world_size=t.env.world_size,
        flops_per_token=t.flops_per_token,
        peak=t.peak,
        max_memory_bytes=mem,
        data_wait_s=wait,
    )
    if stall:
        t.log.warn(stall)
    tokens_seen = step * t.cfg.train.global_batch * t.cfg.data.seq_len
    record.update(t.stats.grad_record(), tokens_seen=tokens_seen)
    record.update(zip(times, slowest))  # fwd_bwd_s, optimizer_s: seconds per step
    record.update(_moe_figures(t))
    if padding is not None:
        record["padding_fraction"] = padding / positions
    if t.peak_float8:
        record["mfu_float8"] = record["tokens_per_s_per_device"] * t.flops_per_token / t.peak_float8
    return record


def _moe_figures(t: Trainer) -> dict[str, float]:
    if t.pipeline is None:
        return moe_record(t.model, t.reduce_over_dp)
    # Each pipeline rank holds some blocks: every rank fills its rows, the pp ranks sum them.
    ids = [i for i in range(t.model_args.n_layers) if t.model_args.is_moe_layer(i)]

    def reduce(table: torch.Tensor) -> torch.Tensor:
        table = t.reduce_over_dp(table)
        dist.all_reduce(table, group=t.pp_group)
        return table

    return moe_record(t.model, reduce, ids, t.device)


def _padding(t: Trainer) -> int | None:
    """Padding positions of packed data since the last record, summed over data-parallel
    ranks (each counted its own rows), or None when the data is not packed."""
    if t.pad_eos is None:
        return None
    count = t.reduce_over_dp(t.pad_positions.double()) * t.dims.dp_size
    t.pad_positions.zero_()
    return round(float(count))


def float8_peak(train_cfg, model_args, device, flops_per_token: float, name: str | None = None):
    """The mixed bf16/FP8 peak (FLOP/s) a float8 run's MFU is also measured against
    (`mfu_float8`); None when float8 is off, on CPU, or on a card without FP8 units. `name`:
    the card's torch.cuda name (default: this process's device)."""
    if train_cfg.float8 == "off" or (name is None and device.type != "cuda"):
        return None
    name = name or torch.cuda.get_device_name(device)
    bf16, fp8 = peak_bf16_flops(name), peak_fp8_flops(name)
    if not (bf16 and fp8):
        return None
    converted = converted_flops_per_token(model_args, train_cfg.float8_min_dim)
    return mixed_peak_flops(bf16, fp8, flops_per_token, converted)
