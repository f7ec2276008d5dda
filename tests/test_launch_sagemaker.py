"""`triaxis launch --backend sagemaker`: the request (botocore's validator offline, then moto's
server), and a SageMaker job's environment handled in-job by a real 2-process run on this
machine."""

import json
import os

import pytest

from tests.helpers import SAGEMAKER, SAGEMAKER_ROLE
from tests.parity import tiny_train_args
from tests.test_launch_backends import one_error
from triaxis.cli import main
from triaxis.launchers import sagemaker
from triaxis.launchers.sagemaker_entry import SageMakerEnv, entry_plan

tiny = tiny_train_args


# -- SageMaker: the request --------------------------------------------------------------------


def sm_args(data, run_dir, *extra):
    return [
        "launch",
        *SAGEMAKER,
        *extra,
        *tiny(data, run_dir),
    ]


def sm_request(capsys, byte_data, run_dir, launch: list, overrides: list) -> dict:
    """The CreateTrainingJob request `triaxis launch --backend sagemaker --dry-run` prints,
    checked against botocore's shape for it."""
    assert main([*sm_args(byte_data, run_dir, "--dry-run", *launch), *overrides]) == 0
    req = json.loads(capsys.readouterr().out)
    sagemaker.validate(req)
    return req


def test_sagemaker_request_validates_offline(byte_data, tmp_path, capsys):
    launch = [
        "--instance-type",
        "ml.p5.48xlarge",
        "--nnodes",
        "2",
        "--input",
        "train=s3://bucket/data/stdlib",
        "--fsx",
        "checkpoints=fs-0123456789abcdef0:/fsx/ckpt",
        "--subnet",
        "subnet-0a1b",
        "--security-group",
        "sg-0a1b",
        "--spot",
        "--max-run-s",
        "3600",
        "--job-name",
        "tiny-run",
    ]
    overrides = ["--parallel.dp_replicate=2", "--parallel.dp_shard=8", "--train.global_batch=64"]
    req = sm_request(capsys, byte_data, tmp_path, launch, overrides)
    assert req["ResourceConfig"] == {
        "InstanceType": "ml.p5.48xlarge",
        "InstanceCount": 2,
        "VolumeSizeInGB": 100,
    }
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert req["AlgorithmSpecification"]["ContainerEntrypoint"][-2:] == [
        "--backend",
        "sagemaker-entry",
    ]
    train, ckpt = req["InputDataConfig"]
    assert (
        train["InputMode"] == "FastFile"
        and train["DataSource"]["S3DataSource"]["S3Uri"] == "s3://bucket/data/stdlib"
    )
    assert ckpt["DataSource"]["FileSystemDataSource"] == {
        "FileSystemId": "fs-0123456789abcdef0",
        "FileSystemAccessMode": "rw",
        "FileSystemType": "FSxLustre",
        "DirectoryPath": "/fsx/ckpt",
    }
    hps = req["HyperParameters"]
    assert hps["model.preset"] == "tiny" and hps["parallel.dp_replicate"] == "2"
    assert hps["metrics.progress"] == "false" and hps["launch.max_restarts"] == "0"
    assert "data.path" not in hps and "train.run_dir" not in hps  # set in the job
    broken = json.loads(json.dumps(req))
    broken["ResourceConfig"]["InstanceCount"] = "two"
    del broken["RoleArn"]
    with pytest.raises(ValueError, match="Missing required parameter.*RoleArn"):
        sagemaker.validate(broken)


def test_hyperparameters_leave_job_side_paths_to_the_job():
    hps = sagemaker.hyperparameters(
        {
            "data.path": "data/stdlib",
            "train.run_dir": "runs/x",
            "checkpoint.dir": "/ckpt",
            "train.compile": True,
            "train.steps": 5,
        },
        {"max_restarts": 2},
    )
    assert hps == {"train.compile": "true", "train.steps": "5", "launch.max_restarts": "2"}
    assert sagemaker.hyperparameters({"data.path": "synthetic"}, {}) == {"data.path": "synthetic"}
    with pytest.raises(ValueError, match="at most 100"):
        sagemaker.hyperparameters({f"a.k{i}": i for i in range(101)}, {})


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--instance-type", "ml.p5.48xlarg"], "did you mean ml.p5.48xlarge?"),
        (["--instance-type", "ml.p5.48xlarge"], "which the job cannot see; pass --input train="),
        (
            [
                "--instance-type",
                "ml.p5.48xlarge",
                "--input",
                "train=s3://b/d",
                "--checkpoint-s3",
                "s3://b/one",
                "--checkpoint.dir=s3://b/two",
            ],
            "name two checkpoint locations; keep one",
        ),
        (
            [
                "--instance-type",
                "ml.p5.48xlarge",
                "--input",
                "train=s3://b/d",
                "--fsx",
                "checkpoints=fs-0123456789abcdef0:/fsx/ckpt",
                "--subnet",
                "subnet-1",
                "--security-group",
                "sg-1",
                "--checkpoint.dir=s3://b/ckpt",
            ],
            "and to the FSx channel `checkpoints`; keep one",
        ),
        (
            [
                "--instance-type",
                "ml.p5.48xlarge",
                "--input",
                "train=s3://b/d",
                "--spot",
                "--max-run-s",
                "7200",
                "--max-wait-s",
                "3600",
            ],
            "--max-wait-s=3600 is below",
        ),
        (["--instance-type", "ml.p5.48xlarge", "--input", "train=/local"], "is not CHANNEL=s3://"),
        (
            ["--instance-type", "ml.p5.48xlarge", "--input", "train=s3://b/d", "--nnodes", "2"],
            "every host would hold only its own ranks' shards and no checkpoint could commit; "
            "set checkpoint.dir=s3://",
        ),
        (
            [
                "--instance-type",
                "ml.p5.48xlarge",
                "--input",
                "train=s3://b/d",
                "--data.path=s3://b/data",
            ],
            "and the `train` input channel name two data locations; keep one",
        ),
        (["--instance-type", "ml.p5.48xlarge", "--parallel.tp=3"], "world size 8 is not divisible"),
    ],
)
def test_sagemaker_bad_input(byte_data, tmp_path, capsys, extra, message):
    assert (
        main([*sm_args(byte_data, tmp_path, "--dry-run"), "--train.global_batch=64", *extra]) == 2
    )
    assert message in one_error(capsys)


def test_sagemaker_reports_every_problem_at_once(byte_data, tmp_path, capsys):
    """A new user learns every missing option from one dry run (not four runs in a row), and
    every problem of the request's channels and checkpoints from the next."""
    bare = ["launch", "--backend", "sagemaker", "--dry-run", *tiny(byte_data, tmp_path)]
    assert main(bare) == 2
    line = one_error(capsys)
    assert "the SageMaker job has 4 problems: (1) --backend sagemaker needs --instance-type" in line
    for piece in ("(2) --backend sagemaker needs --image", "(3) --role ''", "(4) --backend sage"):
        assert piece in line, line
    request = [
        *sm_args(byte_data, tmp_path, "--dry-run", "--instance-type", "ml.p5.48xlarge"),
        "--train.global_batch=64",
        *["--input", "data=/local", "--fsx", "scratch=fs-0123456789abcdef0:/fsx/s"],
    ]
    assert main(request) == 2
    line = one_error(capsys)
    assert "the SageMaker job has 3 problems: (1) --input 'data=/local' is not CHANNEL" in line
    assert "(2) data.path=" in line and "which the job cannot see" in line
    assert "(3) --fsx needs the file system's VPC" in line


def test_s3_data_path_reaches_the_job(byte_data, tmp_path, capsys):
    """data.path = s3://...: no channel (the job streams it itself); the entry point passes it
    on as the config's, on every host."""
    uri = "s3://bucket/data/stdlib"
    launch = ["--instance-type", "ml.p5.48xlarge"]
    overrides = [f"--data.path={uri}", "--train.global_batch=64"]
    req = sm_request(capsys, byte_data, tmp_path, launch, overrides)
    assert "InputDataConfig" not in req and req["HyperParameters"]["data.path"] == uri
    env = {
        "SM_HOSTS": '["algo-1"]',
        "SM_CURRENT_HOST": "algo-1",
        "SM_NUM_GPUS": "8",
        "SM_HPS": json.dumps(req["HyperParameters"]),
    }
    plan = entry_plan(SageMakerEnv.read(env, tmp_path / "opt_ml"))
    assert [o for o in plan["overrides"] if o.startswith("--data.path")] == [f"--data.path={uri}"]


def test_sagemaker_without_credentials_or_region(byte_data, tmp_path, capsys, monkeypatch):
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    # Nowhere to find credentials, and never ask the instance-metadata service.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    args = sm_args(
        byte_data, tmp_path, "--instance-type", "ml.g5.xlarge", "--input", "train=s3://b/d"
    )
    assert main(args) == 2
    assert "no AWS region: pass --region" in one_error(capsys)
    assert main([*args, "--region", "us-east-1"]) == 2
    assert "no AWS credentials" in one_error(capsys)


@pytest.fixture
def moto_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for var, value in (
        ("AWS_ENDPOINT_URL", f"http://{host}:{port}"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield f"http://{host}:{port}"
    server.stop()


@pytest.mark.parametrize(
    "where",
    [["--checkpoint-s3", "s3://bucket/ckpt"], ["--checkpoint.dir=s3://bucket/ckpt"]],
    ids=["flag", "config"],
)
def test_sagemaker_job_goes_through_moto(where, moto_endpoint, byte_data, tmp_path, capsys):
    import boto3

    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "sts:AssumeRole",
                "Principal": {"Service": "sagemaker.amazonaws.com"},
            }
        ],
    }
    iam = boto3.client("iam")
    try:  # moto's state outlives one server: the other parameter may have made it
        iam.create_role(RoleName="triaxis-trainer", AssumeRolePolicyDocument=json.dumps(trust))
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    name = f"triaxis-moto-{len(where)}"
    assert (
        main(
            [
                *sm_args(
                    byte_data,
                    tmp_path,
                    "--instance-type",
                    "ml.g5.12xlarge",
                    "--input",
                    "train=s3://bucket/data",
                    "--spot",
                    "--job-name",
                    name,
                ),
                *where,
                "--train.steps=7",
                "--train.global_batch=16",
            ]
        )
        == 0
    )  # 4 GPUs: 4 x 4
    arn = capsys.readouterr().out.strip().splitlines()[-1]
    assert arn.endswith(f":training-job/{name}")
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName=name)
    assert job["RoleArn"] == SAGEMAKER_ROLE and job["HyperParameters"]["train.steps"] == "7"
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"
    assert job["CheckpointConfig"] == {
        "S3Uri": "s3://bucket/ckpt",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert job["EnableManagedSpotTraining"] is True
    assert "checkpoint.dir" not in job["HyperParameters"]  # the job writes to the mirror


def test_s3_checkpoint_dir_reaches_the_job(byte_data, tmp_path, capsys):
    """checkpoint.dir = s3://...: one host gets SageMaker's mirror (CheckpointConfig) and writes
    to /opt/ml/checkpoints; several hosts write straight into S3 from every rank."""

    def request(*extra):
        launch = ["--instance-type", "ml.p5.48xlarge", "--input", "train=s3://b/d", *extra]
        overrides = ["--checkpoint.dir=s3://bucket/run/ckpt", "--train.global_batch=64"]
        return sm_request(capsys, byte_data, tmp_path, launch, overrides)

    def job_side(req, host, hosts):
        env = {
            "SM_HOSTS": json.dumps(hosts),
            "SM_CURRENT_HOST": host,
            "SM_NUM_GPUS": "8",
            "SM_HPS": json.dumps(req["HyperParameters"]),
        }
        sm = SageMakerEnv.read(env, tmp_path / "opt_ml")
        return [o for o in entry_plan(sm)["overrides"] if o.startswith("--checkpoint.dir=")]

    one = request()
    assert one["CheckpointConfig"] == {
        "S3Uri": "s3://bucket/run/ckpt",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert "checkpoint.dir" not in one["HyperParameters"]
    assert job_side(one, "algo-1", ["algo-1"]) == [
        f"--checkpoint.dir={tmp_path}/opt_ml/checkpoints"
    ]
    two = request("--nnodes", "2")
    assert "CheckpointConfig" not in two
    assert two["HyperParameters"]["checkpoint.dir"] == "s3://bucket/run/ckpt"
    for host in ("algo-1", "algo-2"):
        assert (
            job_side(two, host, ["algo-1", "algo-2"])
            == ["--checkpoint.dir=s3://bucket/run/ckpt"] * 2
        )  # the hyperparameter, then the plan's
