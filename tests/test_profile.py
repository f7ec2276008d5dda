"""Profiler traces of chosen steps and on SIGUSR2 (issue 27, item 3)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.dist import run_workers
from tests.helpers import in_process_trainer
from triaxis.errors import UserError
from triaxis.train.profile import parse_steps


def _trainer(data: str, run_dir, **extra: str):
    return in_process_trainer(data, run_dir, **extra)


def _op_names(path) -> set[str]:
    events = json.loads(path.read_text())["traceEvents"]
    return {e.get("name", "") for e in events}


def _assert_training_step(names: set[str]) -> None:
    assert any(n.startswith("aten::") and "mm" in n for n in names)  # forward matmuls
    assert any("Backward" in n for n in names)  # the backward pass
    assert any("fused_adamw" in n for n in names)  # the optimizer step


def test_profile_steps_write_one_trace_with_the_step_ops(byte_data, tmp_path):
    run = tmp_path / "run"
    _trainer(byte_data, run, **{"profile.steps": "2-3"}).fit()
    assert [p.name for p in (run / "profile").iterdir()] == ["steps_2-3"]
    traces = sorted((run / "profile" / "steps_2-3").iterdir())
    assert [t.name for t in traces] == ["rank_0.json"]
    _assert_training_step(_op_names(traces[0]))


def test_sigusr2_traces_the_next_steps(byte_data, tmp_path, monkeypatch):
    from triaxis.train.loop import Trainer

    train_step = Trainer.train_step

    def signalled(trainer, cursor, step=0, *args, **kwargs):
        if step == 1:  # delivered during step 1: the trace starts with step 2
            os.kill(os.getpid(), signal.SIGUSR2)
        return train_step(trainer, cursor, step, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR2)
    _trainer(byte_data, run, **{"profile.signal_steps": "2"}).fit()
    assert signal.getsignal(signal.SIGUSR2) is before  # handed back at the end
    assert [p.name for p in (run / "profile").iterdir()] == ["steps_2-3"]
    _assert_training_step(_op_names(run / "profile" / "steps_2-3" / "rank_0.json"))


def test_bad_profile_settings_are_one_line_and_write_nothing(byte_data, tmp_path):
    for extra, words in (
        ({"profile.memory_snapshot": "true"}, "CUDA allocator"),
        ({"profile.steps": "6-5"}, "1 <= A <= B"),
    ):
        run = tmp_path / "run"
        with pytest.raises(UserError) as e:
            _trainer(byte_data, run, **extra).fit()
        assert words in str(e.value) and "\n" not in str(e.value)
        assert not run.exists()
    assert parse_steps("5") == (5, 5) and parse_steps("") is None
    for bad in ("x", "0-2", "1-2-3"):
        with pytest.raises(UserError):
            parse_steps(bad)


def _profiled(rank: int, world: int, data: str, run_dir: str) -> None:
    _trainer(data, run_dir, **{"profile.steps": "3", "parallel.dp_shard": "2"}).fit()


@pytest.mark.slow
def test_one_trace_per_rank_at_world_2(byte_data, tmp_path):
    run = tmp_path / "run"
    run_workers(_profiled, 2, byte_data, str(run), timeout_s=240)
    out = run / "profile" / "steps_3-3"
    assert sorted(p.name for p in out.iterdir()) == ["rank_0.json", "rank_1.json"]
    for rank in (0, 1):
        _assert_training_step(_op_names(out / f"rank_{rank}.json"))
