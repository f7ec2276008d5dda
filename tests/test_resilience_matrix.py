"""The resilience matrix: every layout family survives every kind of interruption with exactly
the numbers of an uninterrupted run.

Scenarios: uninterrupted; SIGKILL of one rank between checkpoints, then a relaunch that resumes
by itself; `train.exit_after_steps` slices; a resume into a different layout. Every logged loss
and validation loss (read back from metrics.jsonl, so the killed attempt's records count too)
must equal the single-process uninterrupted run's to 1e-5, and every launch must end within
LAUNCH_TIMEOUT_S: a hang fails the test instead of stalling CI.

Not the cross product: a covering design. Each layout family meets each scenario at least once,
and each option (activation checkpointing, compile, CPU offload, the numerics guard, validation)
is killed and resumed at least once. Gradient accumulation is > 1 in every case. The slowest
combinations (world 8, every pipeline schedule killed, torchrun's own restart) are marked slow:
`bash scripts/test.sh -m slow` (see docs/resilience-matrix.md).

The harness (forked ranks, real SIGKILLs, the relaunch, the comparison) is
tests/resilience_harness.py.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from tests.helpers import command
from tests.resilience_harness import (
    KILL_STEP,
    LAUNCH_TIMEOUT_S,
    SCHEDULES,
    assert_matches,
    config,
    launch,
    logged,
    reference,
    run_scenario,
)
from triaxis.checkpoint import manifest as mf
from triaxis.config import load_config
from triaxis.train.distributed import init_distributed
from triaxis.train.loop import Trainer  # imported once here, not in every forked rank

# -- the matrix -------------------------------------------------------------------------------

# (layout, option, scenario): every family x every scenario, every option under kill + resume.
FAST = [
    ("dp_shard", "val", "uninterrupted"),
    ("dp_shard", "val", "kill"),
    ("dp_shard", "ac", "slices"),
    ("dp_shard", "offload", "kill"),
    ("dp_shard", "rollback", "kill"),
    ("dp_shard", "compile", "kill"),
    ("hsdp", "val", "uninterrupted"),
    ("hsdp", "ac", "kill"),
    ("hsdp", "plain", "slices"),
    ("tp", "val", "uninterrupted"),
    ("tp", "val", "kill"),
    ("tp", "plain", "slices"),
    ("tp_loss_parallel", "val", "uninterrupted"),
    ("tp_loss_parallel", "val", "kill"),
    ("tp_loss_parallel", "ac", "slices"),
    *[(f"pp_{name}", "val", "slices") for name in SCHEDULES],
    ("pp_1f1b", "val", "uninterrupted"),
    ("pp_1f1b", "val", "kill"),
    ("pp_zbv", "ac", "kill"),
    ("pp_dp", "val", "uninterrupted"),
    ("pp_dp", "val", "kill"),
    ("pp_dp", "plain", "slices"),
    ("pp_tp", "val", "uninterrupted"),
    ("pp_tp", "val", "kill"),
]
SLOW = [
    ("pp_tp", "plain", "slices"),
    ("pp_1f1b", "compile", "kill"),
    ("hsdp", "offload", "kill"),
    ("tp", "rollback", "kill"),
    *[(f"pp_{name}", "val", "kill") for name in SCHEDULES if name not in ("1f1b",)],
    ("pp_dp", "offload", "kill"),
    ("pp_tp", "ac", "kill"),
    ("pp_tp_dp", "val", "uninterrupted"),
    ("pp_tp_dp", "val", "kill"),
    ("pp_tp_dp", "val", "slices"),
    # Mixtures of experts: killed and resumed, the routing bias included (issue 28).
    ("dp_shard", "moe", "kill"),
    ("ep", "moe", "kill"),
    ("tp", "moe", "kill"),
    ("pp_1f1b", "moe", "kill"),
]
# The fast lane (`-m "not slow"`) keeps one kill + resume cell (FSDP; plus one relayout below):
# every cell is a multi-process launch of several seconds on 2 cores.
FAST_LANE = [("dp_shard", "rollback", "kill")]
CASES = [
    pytest.param(*c, id="-".join(c), marks=() if c in FAST_LANE else pytest.mark.slow)
    for c in FAST + SLOW
]


@pytest.mark.parametrize("layout,option,scenario", CASES)
def test_matrix(layout, option, scenario, byte_data, tmp_path, tmp_path_factory):
    run_scenario(scenario, byte_data, tmp_path / "run", layout, option)
    assert_matches(tmp_path / "run", reference(byte_data, tmp_path_factory, option))


# Resume into a different layout: the first half in one, the rest in another (and the pipeline
# ones both ways, since their checkpoints hold each stage's own optimizer groups).
RELAYOUT = [
    ("dp_shard", "tp", "val"),
    ("tp_loss_parallel", "pp_1f1b", "val"),
    ("pp_zbv", "hsdp", "val"),
    ("pp_tp", "single", "plain"),
    ("hsdp", "pp_dp", "ac"),
]
RELAYOUT_SLOW = [
    ("pp_interleaved-1f1b", "pp_dualpipev", "val"),
    ("pp_tp_dp", "tp", "val"),
    ("single", "pp_tp_dp", "val"),
    ("ep", "tp", "moe"),
    ("pp_1f1b", "ep", "moe"),
]


@pytest.mark.parametrize(
    "first,then,option",
    [
        pytest.param(*c, id="-".join(c), marks=() if c == RELAYOUT[0] else pytest.mark.slow)
        for c in RELAYOUT
    ]
    + [pytest.param(*c, id="-".join(c), marks=pytest.mark.slow) for c in RELAYOUT_SLOW],
)
def test_resume_into_another_layout(first, then, option, byte_data, tmp_path, tmp_path_factory):
    run = tmp_path / "run"
    world, overrides, env = config(byte_data, run, first, option, **{"train.exit_after_steps": "4"})
    out = launch(world, overrides, env)
    assert out is not None and out[0]["final_step"] == 4
    world, overrides, env = config(byte_data, run, then, option)
    out = launch(world, overrides, env)
    assert out is not None and out[0]["final_step"] == 8
    assert_matches(run, reference(byte_data, tmp_path_factory, option))


# -- complete resume state: each stateful option, killed and resumed == never killed ----------


@pytest.mark.slow
def test_spike_guard_state_survives_a_kill(byte_data, tmp_path):
    """The loss-spike guard decides by its running mean and by how many losses it has seen
    (none are judged in its first 10). Here the uninterrupted run skips step 20's update; a
    resumed run that restarted the guard (nothing judged until step 22) would train on it.
    A factor under 1 makes a short run's ordinary wobble count as a spike: what matters is that
    the decision depends on the guard's state."""
    guard = {
        "train.steps": "20",
        "train.lr": "1e-2",
        "train.spike_factor": "0.85",
        "checkpoint.interval": "4",
        "checkpoint.async_save": "false",
        "checkpoint.keep_last": "0",
    }
    ref_run = tmp_path / "ref"
    world, overrides, env = config(byte_data, ref_run, "dp_shard", "plain", **guard)
    out = launch(world, overrides, env)
    assert out[0]["loop_state"]["guard"]["bad_steps"] >= 1  # the spike the test is about
    run = tmp_path / "run"
    world, overrides, env = config(byte_data, run, "dp_shard", "plain", **guard)
    assert launch(world, overrides, {**env, "TRIAXIS_FAULT_KILL": "1:14"}) is None
    assert mf.list_checkpoints(str(run / "checkpoints"))[-1].step == 12
    out2 = launch(world, overrides, env)
    assert_matches(run, logged(ref_run))
    assert out2[0]["loop_state"] == out[0]["loop_state"]
    final = mf.read_meta(mf.list_checkpoints(str(run / "checkpoints"))[-1].path)
    assert final["cursor"] == 21 * 8  # one batch skipped: 20 steps took 21 batches


@pytest.mark.slow
def test_bad_step_count_survives_a_kill(byte_data, tmp_path):
    """max_bad_steps counts over the whole run: a NaN before the kill and one after it stop a
    resumed run exactly where they stop the uninterrupted one."""
    opts = {
        "train.max_bad_steps": "1",
        "checkpoint.async_save": "false",
        "env.TRIAXIS_FAULT_NAN": "3,7",
    }
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    world, overrides, env = config(byte_data, ref_run, "dp_shard", "plain", **opts)
    with pytest.raises(AssertionError, match="training stopped at step 7: 2 bad steps"):
        launch(world, overrides, env)
    world, overrides, env = config(byte_data, run, "dp_shard", "plain", **opts)
    assert launch(world, overrides, {**env, "TRIAXIS_FAULT_KILL": "1:6"}) is None
    assert mf.list_checkpoints(str(run / "checkpoints"))[-1].step == 4
    with pytest.raises(AssertionError, match="training stopped at step 7: 2 bad steps"):
        launch(world, overrides, env)
    assert logged(run)[0].keys() == logged(ref_run)[0].keys()


@pytest.mark.slow
def test_a_rank_that_finishes_an_async_save_last_does_not_hang_the_next_save(
    byte_data, tmp_path, tmp_path_factory
):
    """Rank 0 finishes each async save a second after rank 1, so for a while rank 1 has
    concluded the save and rank 0 has not. The next save must still meet on every rank (it
    once waited for rank 0 in a barrier rank 1 had skipped: a hang until the group timeout)."""
    world, overrides, env = config(byte_data, tmp_path / "run", "dp_shard", "val")
    assert launch(world, overrides, {**env, "TEST_SLOW_SIDECAR_RANK": "0"}) is not None
    assert_matches(tmp_path / "run", reference(byte_data, tmp_path_factory, "val"))


def test_a_training_step_draws_no_random_numbers(byte_data, tmp_path):
    """Why no RNG state needs restoring per rank: nothing in a step (data order, model,
    optimizer, validation, checkpointing) consumes the global generators. Should that change
    (dropout, random masking), this fails and the generators must join the loop state."""
    world, overrides, env = config(
        byte_data,
        tmp_path / "run",
        "single",
        "val",
        **{"train.steps": "3", "train.on_bad_loss": "skip", "train.spike_factor": "2"},
    )
    trainer = Trainer(
        load_config(None, [f"--{k}={v}" for k, v in overrides.items()]), init_distributed("cpu")
    )
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    trainer.fit()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))


# -- the real launcher: torchrun's agent restarts the group after a SIGKILL -------------------


@pytest.mark.slow
def test_torchrun_restart_of_a_killed_pipeline_matches_uninterrupted(
    byte_data, tmp_path, tmp_path_factory
):
    """The issue's own report: pp=2, SIGKILL, relaunched by `triaxis launch --max-restarts`."""
    run = tmp_path / "run"
    _, overrides, _ = config(byte_data, run, "pp_1f1b", "val")
    args = [f"--{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRIAXIS_FAULT_KILL": f"1:{KILL_STEP}"}
    proc = subprocess.run(
        command(
            "launch",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            *args,
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S * 2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert_matches(run, reference(byte_data, tmp_path_factory, "val"))
