"""The run lease over every folder a run writes (issue 24): each relation of (train.run_dir,
checkpoint.dir) starts alone, and a second live run that would write any folder of the first
is refused in one line naming the folder and the holder. Runs are simulated in-process by
hold_run_lock, the function `triaxis train` holds around training (the end-to-end refusal is
test_runsafe.py's)."""

import contextlib
import json
import os
import socket
import time

import pytest

from triaxis.checkpoint.lock import LEASE_NAME, parents, plan_leases
from triaxis.config import Config
from triaxis.errors import UserError
from triaxis.train.resilience import hold_run_lock, lock_folders

RELATIONS = ["default", "same", "ckpt_inside_run", "run_inside_ckpt", "disjoint", "s3"]
"""(run_dir, checkpoint.dir): the default (RUN/checkpoints), one folder for both, the
checkpoints nested in the run folder (explicitly) or the run folder in the checkpoint folder,
two unrelated folders, checkpoints on S3."""


def layout(relation: str, root, bucket: str = "") -> tuple[str, str]:
    run, ckpt = str(root / "run"), str(root / "ckpt")
    return {
        "default": (run, ""),
        "same": (run, run),
        "ckpt_inside_run": (run, f"{run}/ckpts"),
        "run_inside_ckpt": (f"{ckpt}/run", ckpt),
        "disjoint": (run, ckpt),
        "s3": (run, f"s3://{bucket}/runs/ckpt"),
    }[relation]


def folders_of(run_dir: str, ckpt_dir: str) -> list[str]:
    cfg = Config()
    cfg.train.run_dir, cfg.checkpoint.dir = run_dir, ckpt_dir
    return lock_folders(cfg.checkpoint_dir(), cfg.train.run_dir)


@contextlib.contextmanager
def a_run(run_dir: str, ckpt_dir: str):
    with hold_run_lock(folders_of(run_dir, ckpt_dir), is_main=True) as held:
        yield held


def bucket_for(relation: str, s3) -> str:
    return s3.new_bucket() if relation == "s3" else ""


@pytest.mark.parametrize("relation", RELATIONS)
def test_every_layout_starts_and_leases_each_folder_once(relation, tmp_path, moto_s3):
    run_dir, ckpt_dir = layout(relation, tmp_path, bucket_for(relation, moto_s3))
    with a_run(run_dir, ckpt_dir) as held:
        leased = [lock.folder for lock in held]
        assert len(leased) == len(set(leased))
        # Every folder the run writes is leased itself or lies inside a leased one.
        for folder in (run_dir, ckpt_dir or f"{run_dir}/checkpoints"):
            norm = folder if "://" in folder else os.path.realpath(folder)
            assert norm in leased or set(parents(norm)) & set(leased), (folder, leased)
        want = 2 if relation in ("disjoint", "s3") else 1
        assert len(held) == want, leased
    with a_run(run_dir, ckpt_dir):  # released: the same run starts again
        pass


@pytest.mark.parametrize("relation", RELATIONS)
def test_a_second_run_with_the_same_layout_is_refused(relation, tmp_path, moto_s3):
    run_dir, ckpt_dir = layout(relation, tmp_path, bucket_for(relation, moto_s3))
    with a_run(run_dir, ckpt_dir):
        with pytest.raises(UserError) as e:
            with a_run(run_dir, ckpt_dir):
                pytest.fail("the second run started")
    msg = str(e.value)
    assert "\n" not in msg and "in use by another run" in msg
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in msg
    first_leased = plan_leases(folders_of(run_dir, ckpt_dir))[0][0]
    assert msg.startswith(first_leased), msg  # names the folder


SHARED = [
    # (first run, second run): they share a folder one of them writes.
    ("same run_dir, other checkpoint dirs", ("run", "ckA"), ("run", "ckB")),
    ("same run_dir, default and explicit checkpoints", ("run", ""), ("run", "ckB")),
    ("same checkpoint dir, other run_dirs", ("runA", "ck"), ("runB", "ck")),
    ("second's checkpoints inside the first's run_dir", ("run", ""), ("runB", "run/checkpoints")),
    ("second's run_dir inside the first's checkpoints", ("runA", "ck"), ("ck/run", "ckB")),
    ("first's checkpoints are the second's run_dir", ("runA", "ck"), ("ck", "ckB")),
    ("second's run_dir holds the first's checkpoints", ("runA", "x/ck"), ("x", "x/ck")),
]


@pytest.mark.parametrize("first,second", [s[1:] for s in SHARED], ids=[s[0] for s in SHARED])
def test_a_second_run_sharing_any_folder_is_refused(first, second, tmp_path):
    def absolute(pair):
        return tuple(str(tmp_path / p) if p else "" for p in pair)

    with a_run(*absolute(first)):
        with pytest.raises(UserError, match=f"in use by another run .*pid {os.getpid()}"):
            with a_run(*absolute(second)):
                pytest.fail("the second run started")


def test_runs_in_disjoint_folders_side_by_side_both_start(tmp_path):
    # Inside one parent folder, and one run's folders beside (not inside) the other's.
    with a_run(str(tmp_path / "runA"), str(tmp_path / "runA/ck")):
        with a_run(str(tmp_path / "runB"), ""):
            with a_run(str(tmp_path / "runC"), str(tmp_path / "runA-ck")):
                pass


def test_a_dead_runs_lease_in_a_nested_folder_is_taken_over(tmp_path, capfd):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dead = {
        "host": socket.gethostname(),
        "pid": 1 << 22,  # above pid_max: no such process
        "pid_start": "",
        "started": time.time(),
        "heartbeat": time.time(),
        "expires_s": 120.0,
        "token": "old",
        "job": "",
    }
    (run / "checkpoints" / LEASE_NAME).write_text(json.dumps(dead))
    with a_run(str(run), ""):
        pass
    assert "took over the lease" in capfd.readouterr().err
    assert not (run / "checkpoints" / LEASE_NAME).exists()
