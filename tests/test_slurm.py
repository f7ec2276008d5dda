"""Slurm: the sbatch script, its bad input, and a real cluster (munged, slurmctld and two slurmd,
each node a network-namespace host of its own) running `triaxis launch --backend slurm`: a 2-node
job trains and checkpoints; requeued (`scontrol requeue`, from its time-limit trap) it restarts
from its last checkpoint."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import command
from tests.parity import tiny_train_args
from triaxis.cli import main
from triaxis.launchers.slurm import SlurmJob, render_sbatch

ROOT = Path(__file__).resolve().parents[1]


train_args = tiny_train_args


def test_sbatch_script(tmp_path):
    job = SlurmJob(
        nnodes=4,
        nproc_per_node=8,
        workdir="/shared/work",
        run_dir="/shared/run",
        train_args=["/shared/my.toml", "--train.steps=9"],
        gpus_per_node=8,
        partition="gpu",
        time_limit="04:00:00",
        python="/venv/bin/python",
        sbatch_options=["--exclusive"],
    )
    script = render_sbatch(job)
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --chdir=/shared/work",
        "#SBATCH --exclusive",
        "#SBATCH --output=/shared/run/slurm-%j.out",
        "#SBATCH --open-mode=append",
    ):
        assert line in script.splitlines(), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1" in script
    assert (
        "/venv/bin/python -m triaxis launch --backend torchrun --nnodes 4 "
        "--nproc-per-node 8" in script
    )
    assert "resume=(--checkpoint.resume=auto)" in script and "scontrol requeue" in script
    path = tmp_path / "s.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # valid shell


def test_slurm_bad_input_and_dry_run(byte_data, tmp_path, monkeypatch, capsys):
    args = ["launch", "--backend", "slurm", "--nnodes", "2", *train_args(byte_data, tmp_path)]
    assert main([*args, "--dry-run", "--gpus-per-node", "0"]) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without the Slurm client
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch not found on PATH" in err[0] and "--dry-run" in err[0]
    assert main([*args, "--parallel.tp=4"]) == 2  # the layout is checked before submitting
    assert "world size 2" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster():
    from tests import netns_hosts, slurm_cluster

    reason = netns_hosts.unavailable_reason()
    if reason:
        pytest.skip(reason)
    if slurm_cluster.unavailable_reason():
        subprocess.run(["bash", str(ROOT / "scripts" / "ci_services.sh")], timeout=900)
    assert slurm_cluster.unavailable_reason() is None, slurm_cluster.unavailable_reason()
    with netns_hosts.HostNetwork(["node0", "node1"], tag="s") as net:
        c = slurm_cluster.SlurmCluster(net)
        c.env["OMP_NUM_THREADS"] = "1"
        try:
            c.start()
            yield c
        finally:
            c.stop()


@pytest.mark.slow
def test_two_node_job_trains_and_a_requeue_resumes(cluster, byte_data, tmp_path):
    run = tmp_path / "run"
    submit = cluster.run(
        command(
            "launch",
            "--backend",
            "slurm",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--time",
            "10",
            *train_args(byte_data, run, "--train.steps=40", "--checkpoint.interval=5"),
        ),
        cwd=tmp_path,
    )
    job = submit.stdout.strip().splitlines()[-1]
    assert job.isdigit() and (run / "sbatch.sh").is_file(), submit.stderr
    first = run / "checkpoints" / "step_00000005"
    deadline = time.monotonic() + 150
    while not first.exists():
        state = cluster.job_field(job, "JobState")
        if state not in ("PENDING", "CONFIGURING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(
                f"job {job} {state} before its first checkpoint:\n"
                f"{_log(run, job)[-8000:]}\n{cluster.logs()}"
            )
        time.sleep(0.1)
    # What Slurm does --requeue-margin-s before the time limit: USR1 to the batch shell, whose
    # trap runs `scontrol requeue` (the same requeue as a preemption or an operator's).
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    # Slurm holds a requeued job for about two minutes (Reason=BeginTime); release it now.
    cluster.wait_job(job, {"PENDING"}, 60)
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    state = cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240)
    log = _log(run, job)
    if state != "COMPLETED":
        pytest.fail(f"job {job} {state} after the requeue:\n{log[-8000:]}\n{cluster.logs()}")
    assert f"job {job} run 0 on node[0-1]" in log and f"job {job} run 1 on node[0-1]" in log
    assert f"time limit near, requeueing {job}" in log
    assert "is_host=true" in log and "is_host=false" in log  # one launcher per node
    resumed = re.findall(r"resumed from \S+/step_(\d+) at step", log)
    assert len(resumed) == 1 and int(resumed[0]) >= 5, log[-4000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    by_step: dict[int, list[float]] = {}
    for r in (r for r in records if "loss" in r):
        by_step.setdefault(r["step"], []).append(r["loss"])
    assert sorted(by_step) == list(range(1, 41))
    # Steps run again after the requeue (done before it, past the checkpoint) repeat exactly.
    for step, values in by_step.items():
        assert max(values) - min(values) <= 1e-6 * abs(values[0]), (step, values)
    meta = json.loads((run / "checkpoints" / "step_00000040" / "triaxis.json").read_text())
    assert meta["layout"]["world_size"] == 2


def _log(run: Path, job: str) -> str:
    path = run / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job log)"
