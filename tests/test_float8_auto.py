"""train.float8 = "auto": parallel.auto's planner decides FP8 with the layout.

The choice is checked against the planner run by hand for each recipe (the best layout of each,
by the objective), not against a remembered answer; where FP8 cannot run (no FP8 units, no
torchao) the resolution is off and the reason is in the line the trainer logs."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from triaxis.config import load_config, validate
from triaxis.data.synthetic import SYNTHETIC
from triaxis.errors import UserError
from triaxis.plan.auto import plan_for_world


def _cfg(preset: str, *extra: str):
    return load_config(
        None,
        [
            "--model.preset", preset, "--parallel.auto", "speed", "--train.float8", "auto",
            "--data.seq_len", "4096", "--train.global_batch", "64", *extra,
        ],
    )  # fmt: skip


def _best_time(cfg, gpu: str, recipe: str) -> float:
    """The best layout's step time when the run fixes train.float8=recipe."""
    fixed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, float8=recipe))
    _, best, _ = plan_for_world(fixed, 8, "speed", gpu, gpus_per_node=8)
    return best.time.total


@pytest.mark.parametrize("preset", ["1b", "8b"])
def test_auto_picks_the_recipe_whose_best_layout_is_fastest_on_h100(preset):
    cfg = _cfg(preset, "--train.dtype", "bf16")
    new, best, why = plan_for_world(cfg, 8, "speed", "h100", gpus_per_node=8)
    times = {r: _best_time(cfg, "h100", r) for r in ("off", "tensorwise", "rowwise")}
    assert new.train.float8 == min(times, key=times.get)
    assert best.time.total == pytest.approx(times[new.train.float8])
    assert f"train.float8=auto -> float8 {new.train.float8}:" in why
    assert cfg.train.float8 == "auto"  # the caller's config is left as it was


@pytest.mark.parametrize("gpu", ["a100-80g", "cpu"])
def test_auto_is_off_without_fp8_units_and_says_so(gpu):
    cfg = _cfg("tiny" if gpu == "cpu" else "8b")
    new, _, why = plan_for_world(cfg, 8, "speed", gpu, gpus_per_node=8)
    assert new.train.float8 == "off"
    assert why.endswith(f"train.float8=auto -> float8 off: {gpu} has no FP8 matrix units.")


def test_auto_never_picks_rowwise_under_fp32():
    cfg = _cfg("8b", "--train.dtype", "fp32")
    new, _, why = plan_for_world(cfg, 8, "speed", "h100", gpus_per_node=8)
    assert new.train.float8 in ("off", "tensorwise") and "rowwise" not in why
    validate(new)  # what the trainer then runs passes the config rules


def test_auto_without_torchao_is_off_and_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a)
    )
    new, _, why = plan_for_world(_cfg("8b"), 8, "speed", "h100", gpus_per_node=8)
    assert new.train.float8 == "off"
    assert "torchao is not installed (pip install 'triaxis[float8]')" in why


def test_a_fixed_recipe_is_priced_by_parallel_auto():
    cfg = _cfg("8b", "--train.float8", "tensorwise", "--train.dtype", "bf16")
    new, best, why = plan_for_world(cfg, 8, "speed", "h100", gpus_per_node=8)
    assert new.train.float8 == "tensorwise" and "train.float8=auto" not in why
    # Priced at the FP8 rate: faster than the same planner with float8 off.
    assert best.time.total < _best_time(cfg, "h100", "off")


def test_auto_needs_the_planner():
    cfg = load_config(None, ["--train.float8", "auto"])
    with pytest.raises(UserError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "train.float8='auto' with parallel.auto=off" in msg
    assert "--parallel.auto=speed" in msg


@pytest.mark.slow
def test_a_cpu_run_with_auto_logs_the_choice_and_records_it(tmp_path):
    """The trainer end to end: the log line says off and why; config.toml records off."""
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "triaxis", "train", "--model.preset", "tiny",
        "--parallel.auto", "speed", "--train.float8", "auto", "--train.steps", "2",
        "--train.run_dir", str(run), "--data.path", SYNTHETIC,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train.float8=auto -> float8 off: cpu has no FP8 matrix units" in out.stderr + out.stdout
    assert 'float8 = "off"' in (run / "config.toml").read_text()
