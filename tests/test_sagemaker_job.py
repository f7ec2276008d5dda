"""A SageMaker job from the inside: `triaxis launch --backend sagemaker-entry` reads the job's
environment (files and variables) and runs the plan; a real 2-process job runs on this machine,
and a multi-host request writes one checkpoint to S3 from every rank. The request side:
tests/test_launch_sagemaker.py."""

import json
import os
import subprocess

import pytest

from tests.helpers import command
from tests.parity import tiny_train_args
from tests.test_launch_sagemaker import sm_request
from triaxis.launchers.sagemaker_entry import SageMakerEnv, entry_plan

tiny = tiny_train_args


def run_entry(env: dict, root, cwd, *extra) -> subprocess.CompletedProcess:
    """`triaxis launch --backend sagemaker-entry`, as SageMaker starts it in the job."""
    job = subprocess.run(
        command("launch", "--backend", "sagemaker-entry", "--sm-root", str(root), *extra),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang detector: a loaded machine can stretch the run 10x
        cwd=cwd,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    return job


def requested_job_env(capsys, byte_data, tmp_path, root, hosts: list, extra=()) -> dict:
    """A dry-run SageMaker request (2 ranks, 4 steps, a checkpoint every 2), handed back as the
    environment SageMaker gives a 1-host job rooted at `root`."""
    launch = ["--instance-type", "ml.m5.xlarge", *hosts, "--input", "train=s3://b/d"]
    overrides = ["--parallel.dp_shard=2", "--train.steps=4", "--checkpoint.interval=2", *extra]
    hps = sm_request(capsys, byte_data, tmp_path / "ignored", launch, overrides)["HyperParameters"]
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SM_HOSTS": '["algo-1"]',
        "SM_CURRENT_HOST": "algo-1",
        "SM_NUM_GPUS": "0",
        "SM_CHANNEL_TRAIN": byte_data,
        "SM_HPS": json.dumps(hps),
        "SM_MODEL_DIR": str(root / "model"),
    }


@pytest.mark.slow
def test_a_multi_host_request_writes_one_checkpoint_to_s3_from_every_rank(
    moto_s3, byte_data, tmp_path, capsys
):
    """The hyperparameters of a 2-host request, run as a job here (1 host x 2 processes: the
    rendezvous across hosts is test_multinode's subject): both ranks write their shards to S3,
    rank 0's manifest commits them, nothing lands on the instance's disk."""
    uri = f"s3://{moto_s3.new_bucket()}/run/ckpt"
    root = tmp_path / "opt_ml"
    env = requested_job_env(
        capsys, byte_data, tmp_path, root, ["--nnodes", "2"], [f"--checkpoint.dir={uri}"]
    )
    run_entry(env, root, tmp_path, "--nproc-per-node", "2")
    from triaxis.checkpoint import manifest as mf

    found = mf.list_checkpoints(uri)
    assert [f.step for f in found] == [2, 4]
    meta = mf.read_meta(found[-1].path)
    assert meta["world_size"] == 2 and mf.verify(found[-1].path) == []
    # DCP names each rank's shards __{rank}_{n}.distcp: both ranks' are in the one copy.
    assert {n.split("_")[2] for n in meta["files"] if n.endswith(".distcp")} == {"0", "1"}
    assert not (root / "checkpoints").exists()


# -- SageMaker: inside the job -----------------------------------------------------------------


def test_sagemaker_environment_from_files_and_variables(tmp_path):
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (tmp_path / "input" / "data" / "train").mkdir(parents=True)
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-2", "hosts": ["algo-2", "algo-1"]})
    )
    (config / "hyperparameters.json").write_text(
        json.dumps({"train.steps": "9", "launch.max_restarts": "2"})
    )
    sm = SageMakerEnv.read({"SM_NUM_GPUS": "8"}, tmp_path)
    plan = entry_plan(sm)
    assert sm.node_rank == 1 and plan["rdzv_endpoint"] == "algo-1:29400"
    assert plan["nnodes"] == 2 and plan["nproc_per_node"] == 8 and plan["max_restarts"] == 2
    assert plan["overrides"] == [
        "--train.steps=9",
        f"--data.path={tmp_path}/input/data/train",
        f"--checkpoint.dir={tmp_path}/checkpoints",
        "--checkpoint.resume=auto",
        f"--train.run_dir={tmp_path}/model",
    ]
    # The toolkit's variables win, with JSON-decoded hyperparameters and an FSx checkpoint channel.
    sm = SageMakerEnv.read(
        {
            "SM_HOSTS": '["algo-1"]',
            "SM_CURRENT_HOST": "algo-1",
            "SM_NUM_GPUS": "0",
            "SM_HPS": '{"train.steps": 4, "x.y": true}',
            "SM_CHANNEL_CHECKPOINTS": "/fsx/ckpt",
        },
        tmp_path,
    )
    assert sm.hyperparameters == {"train.steps": "4", "x.y": "true"}
    assert sm.checkpoint_dir == "/fsx/ckpt" and entry_plan(sm)["rdzv_endpoint"] == ""
    with pytest.raises(ValueError, match="runs inside a SageMaker training job"):
        SageMakerEnv.read({}, tmp_path / "elsewhere")


@pytest.mark.slow
def test_a_sagemaker_job_runs_here(byte_data, tmp_path, capsys):
    """The request's hyperparameters, handed back as a 1-host job's environment, train."""
    root = tmp_path / "opt_ml"
    env = requested_job_env(capsys, byte_data, tmp_path, root, ["--nproc-per-node", "2"])
    first = run_entry(env, root, tmp_path)
    assert "SageMaker host algo-1 (1 of 1), 2 process(es)" in first.stderr
    meta = json.loads((root / "checkpoints" / "step_00000004" / "triaxis.json").read_text())
    assert meta["layout"]["world_size"] == 2 and meta["data_path"] == byte_data
    records = [json.loads(x) for x in (root / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert not (tmp_path / "ignored").exists()  # the job's own run folder, not the submitter's
    # Plain `triaxis launch` finds the SageMaker environment by itself; a restarted job (spot
    # interruption) continues from the checkpoints SageMaker restored into the same folder.
    again = subprocess.run(
        command("launch", "--sm-root", str(root), "--dry-run"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "SageMaker job environment found" in again.stderr
    assert f"--checkpoint.dir={root}/checkpoints --checkpoint.resume=auto" in again.stdout
