"""Process-level safety of a run (issue 13): one live run per folder, workers that die with
their launcher, Ctrl-C that saves."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ENV, command, losses, train_args
from triaxis.checkpoint.lock import LEASE_NAME, RunLock
from triaxis.errors import UserError


def write_lease(folder, **fields):
    lease = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": "",
        "started": time.time(),
        "heartbeat": time.time(),
        "expires_s": 120.0,
        "token": "other",
        "job": "",
    }
    lease.update(fields)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / LEASE_NAME).write_text(json.dumps(lease))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- the lease, alone ----------------------------------------------------------------------------


def test_lease_refuses_a_live_holder_and_is_released(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(UserError) as e:
        RunLock(str(tmp_path)).acquire()
    msg = str(e.value)
    assert "\n" not in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    assert "since" in msg and "stop that run" in msg
    first.release()
    assert not (tmp_path / LEASE_NAME).exists()
    again = RunLock(str(tmp_path))
    again.acquire()
    again.release()


@pytest.mark.parametrize("stale", ["dead pid", "expired heartbeat", "reused pid", "torn file"])
def test_lease_of_a_dead_run_is_taken_over(tmp_path, stale):
    if stale == "dead pid":
        write_lease(tmp_path, pid=dead_pid())
    elif stale == "expired heartbeat":
        write_lease(tmp_path, host="elsewhere", heartbeat=time.time() - 3600)
    elif stale == "reused pid":  # our own pid, but another process's start time
        write_lease(tmp_path, pid_start="1")
    else:
        (tmp_path / LEASE_NAME).write_text('{"host": "x", "pi')
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == lock.lease.token
    lock.release()


def test_live_lease_on_another_host_is_respected(tmp_path):
    write_lease(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(UserError, match="host elsewhere, pid 1"):
        RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == "other"


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    lock = RunLock(str(tmp_path), heartbeat_s=0.1)
    lock.acquire()
    first = json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"]
    deadline = time.time() + 30
    while json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"] == first:
        assert time.time() < deadline
        time.sleep(0.05)
    write_lease(tmp_path, host="elsewhere")  # another run decided we were dead
    while lock.lost is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert "host elsewhere" in lock.lost
    lock.release()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == "other"  # not ours


def test_s3_lease(moto_s3):
    folder = f"s3://{moto_s3.new_bucket()}/runs/a/checkpoints"
    first = RunLock(folder, heartbeat_s=0.1)
    first.acquire()
    assert first._create(b"{}") is False  # If-None-Match: * refuses a second creation
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        RunLock(folder).acquire()
    key = f"{folder}/{LEASE_NAME}"
    beat = json.loads(moto_s3.get(key))["heartbeat"]
    deadline = time.time() + 30
    while json.loads(moto_s3.get(key))["heartbeat"] == beat:  # PUT If-Match: our ETag
        assert time.time() < deadline
        time.sleep(0.05)
    first.release()
    assert moto_s3.keys(key) == []
    # A dead run's lease is taken over; a stale ETag (someone changed it since) is refused.
    moto_s3.put(
        key,
        json.dumps(
            {
                "host": "elsewhere",
                "pid": 1,
                "pid_start": "",
                "started": 0.0,
                "heartbeat": 0.0,
                "expires_s": 120.0,
                "token": "t",
                "job": "",
            }
        ).encode(),
    )
    second = RunLock(folder)
    assert second._replace(b"{}", '"0123"', None) is False
    second.acquire()
    assert json.loads(moto_s3.get(key))["token"] == second.lease.token
    second.release()


# -- the lease in a run --------------------------------------------------------------------------


def metric_steps(run_dir) -> list[int]:
    return [
        json.loads(x)["step"]
        for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]


@pytest.mark.slow
def test_second_run_into_a_live_run_folder_is_refused(byte_data, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        command(
            "train",
            *train_args(byte_data, run, "--train.steps=100000", "--checkpoint.interval=5"),
        ),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while not (run / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.1)
        config_before = (run / "config.toml").read_text()
        second = subprocess.run(
            command(
                "launch",
                "--nproc-per-node",
                "2",
                *train_args(byte_data, run, "--train.steps=7"),
            ),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1, second.stderr[-3000:]
        assert f"pid {first.pid}" in errors[0] and "in use by another run" in errors[0]
        assert first.poll() is None  # the first run goes on, untouched
        assert (run / "config.toml").read_text() == config_before
    finally:
        first.send_signal(signal.SIGTERM)  # saves, exits 143
        first.wait(timeout=180)
    steps = metric_steps(run)
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaving
    assert not (run / "checkpoints" / LEASE_NAME).exists()  # released at exit


@pytest.mark.slow
def test_run_takes_over_a_dead_runs_lease(byte_data, tmp_path):
    run = tmp_path / "run"
    write_lease(run / "checkpoints", pid=dead_pid())
    proc = subprocess.run(
        command("train", *train_args(byte_data, run, "--train.steps=2")),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "took over the lease" in proc.stderr
    assert metric_steps(run) == [1, 2]


# -- workers die with their launcher -------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_workers_die_with_a_killed_launcher(byte_data, tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        command(
            "launch",
            "--nproc-per-node",
            "2",
            *train_args(byte_data, run, "--train.steps=100000", "--checkpoint.interval=0"),
        ),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        deadline = time.time() + 180
        while not (run / "metrics.jsonl").exists():  # the workers are training
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.1)
        workers = children_of(launcher.pid)
        assert len(workers) == 2
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its process group
        launcher.wait(timeout=60)
        deadline = time.time() + 60
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if alive(w)], "workers outlived their launcher"
    finally:
        for pid in [launcher.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- Ctrl-C saves ------------------------------------------------------------------------------


def sigint_args(data, run_dir, nproc):
    return train_args(
        data,
        run_dir,
        "--train.steps=40",
        "--checkpoint.interval=0",
        f"--train.micro_batch={8 // nproc}",
    )


def start(nproc, data, run_dir, env=None):
    cmd = ["train"] if nproc == 1 else ["launch", "--nproc-per-node", str(nproc)]
    return subprocess.Popen(
        command(*cmd, *sigint_args(data, run_dir, nproc)),
        env={**ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_ctrl_c_saves_and_resumes_exactly(byte_data, tmp_path, nproc):
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = start(nproc, byte_data, ref)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    # A slower run (0.3 s a step), interrupted as a terminal's Ctrl-C would: SIGINT to the
    # whole foreground process group.
    proc = start(nproc, byte_data, run, env={"TRIAXIS_FAULT_STEP_DELAY_S": "0.3"})
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or len(losses(run)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    stopped = max(losses(run))
    assert 3 <= stopped < 40
    assert f"SIGINT: saved a final checkpoint at step {stopped}" in out + err
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "triaxis.json").exists()  # committed
    assert "Traceback" not in err
    proc = start(nproc, byte_data, run)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'}" in proc.stdout.read()
    expected, got = losses(ref), losses(run)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


@pytest.mark.slow  # a fast lane under 3 min: test_checkpoint's SIGTERM test is the fast one
@pytest.mark.parametrize("nproc", [1, 2])
def test_second_ctrl_c_aborts_at_once(byte_data, tmp_path, nproc):
    run = tmp_path / "run"
    # Every step is slow (5 s): the first Ctrl-C waits for the end of the step, the second
    # must not.
    proc = start(nproc, byte_data, run, env={"TRIAXIS_FAULT_STEP_DELAY_S": "5"})
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    workers = children_of(proc.pid) if nproc > 1 else []
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 130, err[-3000:]
        assert "interrupted again" in err and "without a checkpoint" in err
        assert "saved a final checkpoint" not in out + err
        deadline = time.time() + 60
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if alive(w)]
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_racing_takeover_puts_a_fresh_lease_back(tmp_path):
    """Run B found a stale lease; before B renames it away, run C replaced it with a fresh one.
    B must not destroy C's lease."""
    write_lease(tmp_path, host="elsewhere", heartbeat=0.0, token="stale")
    lock = RunLock(str(tmp_path))
    stale = lock._read()[0]
    write_lease(tmp_path, host="elsewhere", token="fresh")  # C's
    assert lock._take_over_local(stale, b"{}") is False
    assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == "fresh"
    with pytest.raises(UserError, match="host elsewhere"):
        lock.acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE_NAME]  # no leftovers
