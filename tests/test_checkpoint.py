"""Checkpoints: resharding across layouts, exact resume, atomic commit under SIGKILL,
corruption fallback, elastic restarts, preemption, the numerics guard, list / verify."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests import helpers
from tests.dist import WAIT_S, run_workers
from tests.helpers import ENV, command, final_weights, losses, slow_but_first, triaxis
from tests.parity import train_collect
from triaxis.checkpoint import manifest as mf

UNTIED = {"model__tie_embeddings": "false"}


@pytest.mark.slow  # the fast lane resumes into another layout in test_resilience_matrix
def test_reshard_chain_reproduces_the_uninterrupted_run(byte_data, tmp_path):
    """Save under dp_shard=4, resume under tp2 x dp_shard2, then pp2, then one process: the
    losses at every step (data cursor included) equal one uninterrupted single-process run."""
    ckpt = str(tmp_path / "ckpt")
    common = {
        **UNTIED,
        "train__steps": 8,
        "checkpoint__dir": ckpt,
        "checkpoint__interval": 2,
        "train__exit_after_steps": 2,
        "checkpoint__async_save": "true",
    }
    ref = train_collect(
        0,
        1,
        byte_data,
        str(tmp_path / "ref"),
        {**UNTIED, "train__steps": 8, "train__micro_batch": 4},
    )
    layouts = [
        (4, {"parallel__dp_shard": 4, "train__micro_batch": 1}),
        (4, {"parallel__tp": 2, "parallel__dp_shard": 2, "train__micro_batch": 2}),
        (2, {"parallel__pp": 2, "parallel__dp_shard": 1, "train__micro_batch": 4}),
        (1, {"train__micro_batch": 4}),
    ]
    losses = {}
    for world, degrees in layouts:
        out = run_workers(
            train_collect, world, byte_data, str(tmp_path / "run"), {**common, **degrees}
        )
        assert len(out[0]["losses"]) == 2
        losses.update(out[0]["losses"])
    assert sorted(losses) == list(range(1, 9))
    for step, want in ref["losses"].items():
        assert abs(losses[step] - want) <= 1e-5 * abs(want), (step, losses[step], want)
    metas = [mf.read_meta(f.path) for f in mf.list_checkpoints(ckpt)]
    assert [m["cursor"] for m in metas] == [m["step"] * 8 for m in metas]


def train_args(data, run, *extra):
    return helpers.train_args(data, run, "--train.lr=3e-3", "--train.warmup_steps=2", *extra)


@pytest.mark.slow
def test_corrupted_checkpoint_falls_back_and_cli_verify(byte_data, tmp_path):
    run = tmp_path / "run"
    triaxis("train", *train_args(byte_data, run, "--train.steps=4", "--checkpoint.interval=2"))
    ckdir = run / "checkpoints"
    assert json.loads(triaxis("ckpt", "verify", ckdir).stdout.splitlines()[-1])["ok"]
    listing = triaxis("ckpt", "list", ckdir).stdout
    assert "world 1" in listing and len(listing.strip().splitlines()) == 3
    shard = next((ckdir / "step_00000004").glob("__0_*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = triaxis("ckpt", "verify", ckdir, "--step", 4, check=False)
    assert bad.returncode == 1 and "__0_0.distcp fails its checksum" in bad.stdout
    resumed = triaxis(
        "train", *train_args(byte_data, run, "--train.steps=5", "--checkpoint.interval=2")
    )
    # found while loading (one read), not by a separate pass over the files
    assert "skipping checkpoint" in resumed.stdout and "step_00000004" in resumed.stdout
    assert "__0_0.distcp fails its checksum" in resumed.stdout
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    # the bad checkpoint is set aside for repair, never overwritten by the new step 4
    assert (ckdir / "step_00000004.invalid" / shard.name).read_bytes() == bytes(raw)
    assert [f.step for f in mf.list_checkpoints(str(ckdir))] == [2, 4, 5]


@pytest.mark.slow
def test_sigkill_during_async_saves_never_exposes_a_partial_checkpoint(byte_data, tmp_path):
    run = tmp_path / "run"
    args = train_args(
        byte_data,
        run,
        "--train.steps=400",
        "--checkpoint.interval=1",
        "--checkpoint.keep_last=2",
        "--model.dim=128",
        "--model.n_layers=4",
    )
    for _attempt in range(6):
        proc = subprocess.Popen(
            command("train", *args),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        root = run / "checkpoints"
        deadline = time.time() + 120
        # wait for two commits, then for a save in flight (a step folder without a manifest)
        while time.time() < deadline and proc.poll() is None:
            if len(mf.list_checkpoints(str(root))) >= 2 and mf.uncommitted(str(root)):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if mf.uncommitted(str(root)):
            break
    partial = mf.uncommitted(str(root))
    assert partial, "never caught a save in flight"
    for found in mf.list_checkpoints(str(root)):
        assert mf.verify(found.path) == []  # every visible checkpoint is whole
    latest = mf.list_checkpoints(str(root))[-1].step
    out = triaxis(
        "train",
        *args[:-3],
        f"--train.steps={latest + 2}",
        "--checkpoint.interval=1",
        "--model.dim=128",
        "--model.n_layers=4",
    )
    assert f"at step {latest}" in out.stdout
    assert not mf.uncommitted(str(root))  # the interrupted save was cleaned up


@pytest.mark.slow
def test_elastic_restart_after_sigkill_matches_uninterrupted(byte_data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ["launch", "--nproc-per-node", 2, "--max-restarts", 1]
    extra = ["--train.steps=8", "--checkpoint.interval=2", "--parallel.dp_shard=2"]
    triaxis(*common, *train_args(byte_data, ref, *extra))
    env = {**ENV, "TRIAXIS_FAULT_KILL": "1:6"}  # rank 1 SIGKILLs itself before step 6
    out = triaxis(*common, *train_args(byte_data, run, *extra), env=env)
    assert "resumed from" in out.stdout
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, 9))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), step
    a, b = final_weights(run / "checkpoints"), final_weights(ref / "checkpoints")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.slow
def test_sigterm_writes_a_final_checkpoint(byte_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        command(
            "train",
            *train_args(byte_data, run, "--train.steps=100000", "--checkpoint.interval=0"),
        ),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + WAIT_S
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143
    found = mf.list_checkpoints(str(run / "checkpoints"))
    assert len(found) == 1 and found[0].step == max(losses(run))
    assert "SIGTERM: saved a final checkpoint" in stdout


@pytest.mark.parametrize("mode", slow_but_first("rollback", "skip"))
def test_numerics_guard(mode, byte_data, tmp_path):
    run = tmp_path / "run"
    env = {**ENV, "TRIAXIS_FAULT_NAN": "3"}
    out = triaxis(
        "train",
        *train_args(
            byte_data,
            run,
            "--train.steps=5",
            "--checkpoint.interval=2",
            f"--train.on_bad_loss={mode}",
        ),
        env=env,
    )
    word = "update skipped" if mode == "skip" else "rolled back to step 2"
    assert word in out.stdout and "non-finite loss nan" in out.stdout
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5] and all(v == v for v in got.values())  # no NaN logged
    # the poisoned batch was never trained on: a clean run that starts one batch later after
    # step 2 would see the same data; here it is enough that the cursor moved past it
    meta = mf.read_meta(mf.list_checkpoints(str(run / "checkpoints"))[-1].path)
    assert meta["step"] == 5 and meta["cursor"] == 6 * 8


@pytest.mark.slow
def test_numerics_guard_stops_past_the_limit(byte_data, tmp_path):
    env = {**ENV, "TRIAXIS_FAULT_NAN": "2,3"}
    out = triaxis(
        "train",
        *train_args(byte_data, tmp_path / "r", "--train.steps=5", "--train.max_bad_steps=1"),
        env=env,
        check=False,
    )
    assert out.returncode == 2
    assert "2 bad steps" in out.stderr and "exceed train.max_bad_steps=1" in out.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="mounting a small tmpfs in a private mount namespace needs root",
)
@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_full_disk_is_one_line_and_loses_nothing(async_save, byte_data, tmp_path):
    """A real ENOSPC: the run folder lives on a 5 MiB tmpfs (one tiny checkpoint fits, two do
    not) in a private mount namespace. The second save fails with one line and exit 2; the first
    checkpoint still verifies; after the disk grows, the run resumes from it and repeats the
    losses the failed run logged after it."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    run = disk / "run"
    args = " ".join(
        train_args(
            byte_data,
            run,
            "--train.steps=6",
            "--checkpoint.interval=2",
            f"--checkpoint.async_save={async_save}",
        )
    )
    py = f"{sys.executable} -m triaxis"
    script = f"""
    mount -t tmpfs -o size=5m tmpfs {disk} || exit 99
    {py} train {args} > {out}/first.out 2> {out}/first.err; echo $? > {out}/first.rc
    {py} ckpt verify {run}/checkpoints > {out}/verify.out; echo $? > {out}/verify.rc
    mount -o remount,size=64m {disk}
    {py} train {args} > {out}/second.out 2> {out}/second.err; echo $? > {out}/second.rc
    cp {run}/metrics.jsonl {out}/
    ls {run}/checkpoints > {out}/ls
    {py} ckpt verify {run}/checkpoints >> {out}/verify.out || echo bad >> {out}/verify.rc
    """
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    read = lambda name: (out / name).read_text()  # noqa: E731
    assert read("first.rc").strip() == "2", read("first.err")[-3000:]
    err = read("first.err").strip()
    assert err.startswith("error: checkpoint ") and "\n" not in err, err
    assert "step_00000004: the disk is full" in err and "previous checkpoint is untouched" in err
    assert read("verify.rc").strip() == "0", read("verify.out")  # before and after resuming
    assert read("verify.out").count('"ok": true') == 4, read("verify.out")
    assert read("second.rc").strip() == "0", read("second.err")[-3000:]
    assert "at step 2" in read("second.out")
    # The partial step 4 was removed at start and written again, whole.
    assert read("ls").split() == ["step_00000002", "step_00000004", "step_00000006"]
    logged = [json.loads(x) for x in read("metrics.jsonl").splitlines()]
    logged = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    # An async save fails in the background: the first run may log a step or two past it.
    cut = next(i for i in range(1, len(logged)) if logged[i][0] <= logged[i - 1][0])
    first, second = dict(logged[:cut]), logged[cut:]
    assert [s for s, _ in second] == [3, 4, 5, 6] and min(first) == 1 and max(first) >= 4
    assert all(first[s] == loss for s, loss in second if s in first), (first, second)


def _skewed_run(rank: int, world: int, data: str, run_dir: str, overrides: dict) -> list[int]:
    train_collect(rank, world, data, run_dir, overrides)
    return [f.step for f in mf.list_checkpoints(overrides["checkpoint__dir"])]


@pytest.mark.parametrize(
    "world,skew",
    [
        # rank 1's sidecar lands late and rank 1 polls late: rank 0 sees the save unfinished
        # in the very step where rank 1 sees it finished
        (2, "1:sidecar:0.4,1:poll:0.2"),
        # the same with a slow write on rank 0, and ranks that poll at three different times
        pytest.param(4, "0:write:0.5,3:sidecar:1.0,3:poll:0.5,1:poll:0.2", marks=pytest.mark.slow),
    ],
)
def test_async_saves_commit_under_rank_skew(world, skew, byte_data, tmp_path, monkeypatch):
    """The commit protocol is symmetric: whatever rank finishes its write, its sidecar or its
    poll first, every rank runs the same collectives, nobody hangs, and every async save of
    the run commits."""
    monkeypatch.setenv("TRIAXIS_TEST_CKPT_DELAY", skew)  # read once per Checkpointer
    ckpt = str(tmp_path / "ckpt")
    overrides = {
        **UNTIED,
        "train__steps": 8,
        "checkpoint__dir": ckpt,
        "checkpoint__interval": 2,
        "checkpoint__keep_last": 0,
        "checkpoint__async_save": "true",
        "parallel__dp_shard": world,
        "train__micro_batch": 8 // world,
    }
    out = run_workers(_skewed_run, world, byte_data, str(tmp_path / "run"), overrides)
    assert out[0] == [2, 4, 6, 8]
    assert all(mf.verify(f.path) == [] for f in mf.list_checkpoints(ckpt))
