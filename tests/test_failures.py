"""A failure on one rank stops the whole job at once and the launcher prints that rank's cause;
a rank that stops making progress is named by the watchdog (issue 19)."""

import os
import subprocess

import pytest

from tests.helpers import command

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GENEROUS_S = 240  # a bound on the wait, not a timing assertion; the collective timeout is 300 s


def launch(data, run_dir, nproc, *extra, env=None, timeout=GENEROUS_S):
    args = [
        "launch",
        "--nproc-per-node",
        nproc,
        "--model.preset=tiny",
        f"--data.path={data}",
        "--data.seq_len=32",
        f"--train.run_dir={run_dir}",
        "--train.global_batch=8",
        f"--train.micro_batch={8 // nproc}",
        "--train.steps=6",
        "--metrics.log_every=2",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
        "--checkpoint.interval=4",
        "--train.val_every=4",
        "--train.val_batches=1",
        *extra,
    ]
    return subprocess.run(
        command(*map(str, args)),
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc,rank,point,extra",
    [
        (2, 1, "forward@3", ()),  # all slow: the fast lane keeps the watchdog test
        *[
            pytest.param(*case, marks=pytest.mark.slow)
            for case in [
                (2, 1, "start", ()),
                (2, 1, "checkpoint", ()),
                (2, 0, "validation", ()),
                (2, 1, "logging@2", ()),
                (4, 2, "forward@2", ()),
                (2, 0, "forward@2", ("--parallel.pp=2", "--parallel.dp_shard=1")),
            ]
        ],  # send/recv peers
    ],
)
def test_one_rank_error_stops_the_job_and_names_its_cause(
    byte_data, tmp_path, nproc, rank, point, extra
):
    # subprocess.run's timeout is the "within a bound" check: 240 s < the 300 s collective
    # timeout peers would otherwise wait.
    proc = launch(
        byte_data, tmp_path / "run", nproc, *extra, env={"TRIAXIS_FAULT_ERROR": f"{rank}:{point}"}
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    where = point.split("@")[0]
    assert f"rank {rank} failed: InjectedFault: injected fault at {where}" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert "Traceback" in proc.stderr  # a bug comes with its traceback


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_watchdog_names_the_stuck_rank(byte_data, tmp_path, nproc):
    stuck = nproc - 1
    cmd = ["--train.hang_timeout_s=5"]
    if nproc == 1:  # one process: `triaxis train`
        proc = subprocess.run(
            command(
                "train",
                "--model.preset=tiny",
                f"--data.path={byte_data}",
                "--data.seq_len=32",
                f"--train.run_dir={tmp_path / 'run'}",
                "--train.global_batch=8",
                "--train.micro_batch=8",
                "--train.steps=6",
                "--metrics.progress=false",
                "--metrics.tensorboard=false",
                *cmd,
            ),
            env={**ENV, "TRIAXIS_FAULT_HANG": "0:forward@3"},
            capture_output=True,
            text=True,
            timeout=GENEROUS_S,
        )
    else:
        proc = launch(
            byte_data,
            tmp_path / "run",
            nproc,
            *cmd,
            env={"TRIAXIS_FAULT_HANG": f"{stuck}:forward@3"},
        )
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [
        x for x in proc.stderr.splitlines() if "no progress for 5 s" in x and "stuck rank(s)" in x
    ]
    assert lines, proc.stderr[-3000:]
    assert f"stuck rank(s) [{stuck}]: rank {stuck} at step 2, at " in lines[-1]
    assert "in inject_fault" in lines[-1]
    if nproc > 1:
        assert "rank(s) [0] waiting for them in collectives" in lines[-1]
    assert "Thread 0x" in proc.stderr or "Current thread" in proc.stderr  # the stacks


def _failure(exitcode, line=None, t=0.0, tb="", code=1, kind="error"):
    from types import SimpleNamespace

    data = (
        {"message": "<NONE>"}
        if line is None
        else {
            "message": line,
            "triaxis": {
                "rank": 0,
                "line": line,
                "traceback": tb,
                "time": t,
                "kind": kind,
                "exit_code": code,
            },
        }
    )
    return SimpleNamespace(exitcode=exitcode, timestamp=int(t) + 5, error_file_data=data)


def test_launcher_names_the_first_failure(capsys):
    from triaxis.errors import UserError
    from triaxis.launchers.torchrun import report_failures

    # The peer's error came later (its collective broke when rank 1 left).
    assert (
        report_failures(
            {
                0: _failure(1, "RuntimeError: Connection closed by peer", 10.5),
                1: _failure(
                    1,
                    "OSError: [Errno 13] Permission denied",
                    10.2,
                    tb="Traceback (most recent call last):\n ...",
                ),
            }
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "rank 1 failed: OSError: [Errno 13] Permission denied" in err
    assert "rank(s) [0] stopped after rank 1" in err and "Traceback" in err
    # A rank killed by a signal writes no error file: it is the cause.
    assert (
        report_failures({0: _failure(1, "RuntimeError: Connection reset", 1.0), 3: _failure(-9)})
        == 137
    )
    assert "rank 3 failed: killed by SIGKILL" in capsys.readouterr().err
    # SIGTERM is the agent closing the group after a failure: the rank with the error is first.
    assert report_failures({0: _failure(-15), 2: _failure(1, "RuntimeError: injected", 3.0)}) == 1
    assert "rank 2 failed: RuntimeError: injected" in capsys.readouterr().err
    # A user error every rank met: one line, exit 2.
    with pytest.raises(UserError, match=r"^rank 0: folder in use$"):
        report_failures(
            {
                0: _failure(2, "folder in use", 1.0, code=2),
                1: _failure(2, "folder in use", 1.1, code=2),
            }
        )
    assert "stopped after" not in capsys.readouterr().err
