"""No host sync in the training hot path (issue 18).

On a GPU every host read of a device value (`.item()`, `float(t)`, `if t:`) and every blocking
collective stalls the CPU until the queued kernels finish, so the next step cannot be queued
behind the current one. Here every such read and every collective that triaxis itself issues
without `async_op=True` is counted per training step; outside logging, checkpoint and
validation steps there must be none, at world 1 and at world 2 (FSDP, gloo, forked ranks).

What is deliberately not counted: other threads (an async checkpoint's writer), collectives
that torch issues inside FSDP / DTensor (on NCCL they are ordered on the device streams, not
waited for by the host), and the preemption flag, which lives in host memory (a gloo
all-reduce started one step earlier, read through numpy): no device work is waited for there.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_workers
from triaxis.config import load_config
from triaxis.train.distributed import init_distributed

READS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__array__",
    "__format__",
)
"""Tensor methods that hand a value to the host: on a GPU each one waits for the device."""

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
)

BASE = {
    "model.preset": "tiny",
    "data.seq_len": "32",
    "train.steps": "12",
    "train.lr": "3e-3",
    "train.warmup_steps": "2",
    "train.global_batch": "8",
    "train.device": "cpu",
    "train.val_every": "4",
    "train.val_batches": "1",
    "train.spike_factor": "3",
    "checkpoint.interval": "5",
    "metrics.log_every": "6",
    "metrics.tensorboard": "false",
    "metrics.progress": "false",
}
SYNC_STEPS = {1, 6, 12} | {4, 8, 12} | {5, 10, 12}
"""Log steps (the first, every 6th, the last), validation steps, checkpoint steps."""


class SyncCounter:
    """Counts host reads and triaxis's own blocking collectives, by the training step that runs
    (from the start of one train_step call to the start of the next: a step's logging, validation
    and checkpoint count as that step's)."""

    def __init__(self) -> None:
        self.step = 0
        self.by_step: dict[int, list[str]] = defaultdict(list)
        self.before_step = lambda: None  # a hook: called as each step starts

    def _seen(self, what: str) -> None:
        # The loop's own thread: an async checkpoint's writer thread (DCP's background write of
        # the staged copy) may wait as it likes without holding up the next step.
        if threading.current_thread() is threading.main_thread():
            self.by_step[self.step].append(what)

    @contextlib.contextmanager
    def installed(self, trainer_cls):
        undo = []

        def patch(owner, name, value):
            had = name in vars(owner)
            old = vars(owner).get(name)
            setattr(owner, name, value)
            undo.append((owner, name, had, old))

        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(self_, *args, _name=name, _original=original, **kwargs):
                frame = sys._getframe(1)
                where = f"{frame.f_globals.get('__name__')}:{frame.f_lineno}"
                self._seen(f"Tensor.{_name} in {where}")
                return _original(self_, *args, **kwargs)

            patch(torch.Tensor, name, read)
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def collective(*args, _name=name, _original=original, **kwargs):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("triaxis") and not kwargs.get("async_op"):
                    self._seen(f"dist.{_name} from {caller}")
                return _original(*args, **kwargs)

            patch(dist, name, collective)
        train_step = trainer_cls.train_step

        def counted_step(trainer, cursor, step=0, *args, **kwargs):
            self.before_step()
            self.step = step
            return train_step(trainer, cursor, step, *args, **kwargs)

        patch(trainer_cls, "train_step", counted_step)
        try:
            yield self
        finally:
            for owner, name, had, old in reversed(undo):
                if had:
                    setattr(owner, name, old)
                else:
                    delattr(owner, name)


def _count(
    rank: int, world: int, data: str, run_dir: str, extra: dict, device: str = "cpu"
) -> dict[int, list[str]]:
    from triaxis.train.loop import Trainer

    values = {**BASE, "data.path": data, "train.run_dir": run_dir, **extra}
    values["train.device"] = device
    cfg = load_config(None, [f"--{k}={v}" for k, v in values.items()])
    trainer = Trainer(cfg, init_distributed(device))
    counter = SyncCounter()
    with counter.installed(Trainer), _cuda_syncs(counter, device):
        result = trainer.fit()
    assert result.final_step == 12
    return dict(counter.by_step)


@contextlib.contextmanager
def _cuda_syncs(counter: SyncCounter, device: str):
    """On a GPU, also every synchronizing CUDA call torch itself makes (C++ included), as
    torch.cuda.set_sync_debug_mode reports them, by step."""
    if device != "cuda":
        yield
        return
    import warnings

    def flush() -> None:  # what was reported so far belongs to the step that was running
        while caught:
            w = caught.pop(0)
            if "synchroniz" in str(w.message):
                counter.by_step[counter.step].append(f"cuda sync: {str(w.message)[:80]}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counter.before_step = flush
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
            flush()


def _assert_no_sync_outside(by_step: dict[int, list[str]]) -> None:
    hot = {s: calls for s, calls in by_step.items() if s and s not in SYNC_STEPS and calls}
    assert not hot, f"host syncs on steps that neither log, validate nor checkpoint: {hot}"
    # The counter sees syncs where they are allowed (else this test could not fail).
    assert by_step.get(1) and by_step.get(12), by_step


@pytest.mark.parametrize("on_bad_loss", ["skip", "rollback", "off"])
def test_no_host_sync_between_log_steps_one_process(on_bad_loss, byte_data, tmp_path):
    by_step = _count(
        0,
        1,
        byte_data,
        str(tmp_path / "run"),
        {"train.on_bad_loss": on_bad_loss, "train.micro_batch": "4"},
    )
    _assert_no_sync_outside(by_step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_cuda_sync_between_log_steps_on_a_gpu(byte_data, tmp_path):
    extra = {"train.micro_batch": "4", "train.dtype": "bf16"}
    by_step = _count(0, 1, byte_data, str(tmp_path / "run"), extra, "cuda")
    _assert_no_sync_outside(by_step)


@pytest.mark.slow
def test_no_host_sync_between_log_steps_fsdp_world_2(byte_data, tmp_path):
    extra = {"parallel.dp_shard": "2", "train.micro_batch": "2"}
    results = run_workers(_count, 2, byte_data, str(tmp_path / "run"), extra, timeout_s=240)
    for by_step in results:
        _assert_no_sync_outside(by_step)


# -- what the hot path does instead -----------------------------------------------------------


def _trainer(data: str, run_dir, **extra: str):
    from triaxis.train.loop import Trainer

    values = {
        **BASE,
        "data.path": data,
        "train.run_dir": str(run_dir),
        "train.micro_batch": "4",
        "train.val_every": "0",
        "checkpoint.interval": "0",
        "checkpoint.save_final": "false",
        **extra,
    }
    cfg = load_config(None, [f"--{k}={v}" for k, v in values.items()])
    return Trainer(cfg, init_distributed("cpu"))


def test_a_non_finite_step_is_a_no_op_on_the_device(byte_data, tmp_path):
    """The update of a poisoned step changes nothing (weights, moments, AdamW's step count),
    and the host hears of it only when it settles the flags."""
    from triaxis.train.numerics import Numerics

    trainer = _trainer(byte_data, tmp_path / "run")
    trainer.numerics = Numerics(trainer.cfg.train, trainer.log)  # as fit() does
    trainer.train_step(0, 1)  # one good step: the optimizer state exists
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    moments = {
        id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()
    }
    trainer.faults.nan_steps = {2}
    trainer.train_step(8, 2)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, s in trainer.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, moments[id(p)][k]), k  # exp_avg, exp_avg_sq, step
    logged, bad = trainer.numerics.settle()
    assert logged is None and [(b.step, b.cursor) for b in bad] == [(2, 8)]
    assert "non-finite gradients" in bad[0].reason
    trainer.train_step(8, 2)  # the same batch, unpoisoned: an update again
    assert not torch.equal(trainer.model.state_dict()["norm.weight"], weights["norm.weight"])


def test_a_skip_learned_at_the_next_log_step_matches_one_learned_at_once(byte_data, tmp_path):
    """A NaN at step 3: logging every step, the host learns of it at once; logging every 4th
    step, at step 4. Either way the update is skipped, the batch is dropped and step 3 is
    trained on the next batch: the same losses and weights (at a constant learning rate: until
    the host learns of a skip the schedule runs one step ahead, see docs/resilience.md)."""
    import os

    runs = {}
    for log_every in ("1", "4"):
        os.environ["TRIAXIS_FAULT_NAN"] = "3"
        trainer = _trainer(
            byte_data,
            tmp_path / log_every,
            **{
                "train.steps": "8",
                "train.warmup_steps": "0",
                "train.min_lr_ratio": "1",
                "metrics.log_every": log_every,
            },
        )
        result = trainer.fit()
        runs[log_every] = (result, trainer.loop_state(), trainer.model.state_dict())
    (every, every_state, every_w), (fourth, fourth_state, fourth_w) = runs["1"], runs["4"]
    assert sorted(fourth.losses) == [1, 4, 8] and fourth.final_step == 8
    for step in fourth.losses:
        assert fourth.losses[step] == pytest.approx(every.losses[step], rel=1e-6), step
    # The same batch dropped, the same count (the running mean differs: it follows the losses
    # the host reads, which are the logged ones).
    for state in (every_state, fourth_state):
        assert state["skip_cursors"] == [16] and state["guard"]["bad_steps"] == 1
    for k, v in every_w.items():
        torch.testing.assert_close(fourth_w[k], v, rtol=1e-6, atol=1e-7)


def test_rewind_scheduler_is_the_schedule_without_the_skipped_steps():
    from triaxis.config import TrainConfig
    from triaxis.train.optim import build_scheduler, rewind_scheduler

    cfg = TrainConfig(steps=20, warmup_steps=4)
    opts = [torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0) for _ in range(2)]
    skipped, plain = (build_scheduler(o, cfg) for o in opts)
    for _ in range(6):
        skipped.step()
    for _ in range(4):
        plain.step()
    rewind_scheduler(skipped, 2)
    assert skipped.get_last_lr() == plain.get_last_lr()
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]
    skipped.step()
    plain.step()
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]
    assert skipped.state_dict()["last_epoch"] == plain.state_dict()["last_epoch"] == 5


def _agree(rank: int, world: int, signal_at: int) -> list[bool]:
    import os
    import signal

    from triaxis.train.resilience import PreemptionWatch

    watch = PreemptionWatch()
    answers = []
    try:
        for step in range(1, 7):
            if rank == 1 and step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during this step, on one rank
            answers.append(watch.should_stop())
        watch.finish()
    finally:
        watch.close()
    return [answers, watch.signal]


def test_preemption_is_agreed_one_step_later_on_every_rank():
    """Rank 1 alone is signalled during step 2: without waiting on anything, both ranks say
    stop from step 3 on (the all-reduce started after step 2 is read after step 3)."""
    import signal

    results = run_workers(_agree, 2, 2, timeout_s=120)
    for answers, sig in results:
        assert answers == [False, False, True, True, True, True]
        assert sig == signal.SIGTERM  # rank 0 learns which signal it was


def test_a_batch_is_staged_contiguous_for_its_host_to_device_copy():
    """inputs / targets are strided views of one (B, T+1) batch; what the trainer copies to a
    GPU must be contiguous (and pinned there), else the copy goes through a pageable temporary."""
    from triaxis.train.distributed import staged_for_copy

    tokens = torch.arange(2 * 9).view(2, 9)
    pin = torch.cuda.is_available()
    for view in (tokens[:, :-1], tokens[:, 1:]):
        assert not view.is_contiguous()
        staged = staged_for_copy(view, pin)
        assert staged.is_contiguous() and torch.equal(staged, view)
        assert staged.is_pinned() == pin
