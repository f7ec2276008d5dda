"""SageMaker: one CreateTrainingJob request, built from the triaxis config, submitted with boto3.

The request runs the user's image (which has triaxis installed) with the entry point
`python3 -m triaxis launch --backend sagemaker-entry` on every instance; that entry point reads
SageMaker's environment and runs torchrun with the c10d rendezvous on the first host (see
sagemaker_entry.py). What the request carries:

    AlgorithmSpecification  image, entry point, metric regexes for the console
    HyperParameters         the config's non-default fields as "section.field": "value", plus
                            "launch.*" options of the in-job launcher
    InputDataConfig         channel `train` = the prepared data folder: S3 (File or FastFile
                            mode) or FSx for Lustre; more channels by name. An s3://
                            data.path needs none: it goes as a hyperparameter, streamed
    CheckpointConfig        one host: the S3 URI (checkpoint.dir = s3://..., or --checkpoint-s3)
                            <-> /opt/ml/checkpoints, the in-job checkpoint.dir. Several hosts:
                            no mirror; checkpoint.dir = that URI, written by every rank (or a
                            shared FSx `checkpoints` channel; per-host local disks: refused)
    EnableManagedSpotTraining + MaxWaitTimeInSeconds   spot capacity, resumed from checkpoints

It is checked offline against botocore's service model before it is printed or sent.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from triaxis.errors import UserError, nearest

ENTRYPOINT = ["python3", "-m", "triaxis", "launch", "--backend", "sagemaker-entry"]
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
# Set by the entry point from SageMaker's own paths; a value from the submitting machine is moot.
JOB_SIDE_KEYS = ("data.path", "checkpoint.dir", "train.run_dir")
ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
FSX = re.compile(r"^(fs-[0-9a-f]{8,17}):(/[^:]+?)(?::(ro|rw))?$")


def add_sagemaker_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--image", default="", help="SageMaker: training image URI (with triaxis)")
    g.add_argument("--role", default="", help="SageMaker: execution role ARN")
    g.add_argument("--instance-type", default="", help="SageMaker: e.g. ml.p5.48xlarge")
    g.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="CHANNEL=s3://...",
        help="SageMaker: input channel from S3 (`train` = the prepared data)",
    )
    g.add_argument(
        "--input-mode",
        default="FastFile",
        choices=["File", "FastFile"],
        help="SageMaker: S3 channels copied before start (File) or streamed (FastFile)",
    )
    g.add_argument(
        "--fsx",
        action="append",
        default=[],
        metavar="CHANNEL=fs-ID:/MOUNT/PATH[:ro|rw]",
        help="SageMaker: channel from FSx for Lustre (needs --subnet and "
        "--security-group); `checkpoints` (rw) holds shared checkpoints",
    )
    g.add_argument("--subnet", action="append", default=[], help="SageMaker: VPC subnet id")
    g.add_argument(
        "--security-group", action="append", default=[], help="SageMaker: VPC security group id"
    )
    g.add_argument("--output-s3", default="", help="SageMaker: S3 URI for the job's output")
    g.add_argument(
        "--checkpoint-s3",
        default="",
        help="SageMaker: S3 URI of the job's checkpoints (resume, spot); the same "
        "as checkpoint.dir=s3://...",
    )
    g.add_argument("--spot", action="store_true", help="SageMaker: managed spot training")
    g.add_argument(
        "--max-run-s",
        type=int,
        default=24 * 3600,
        help="SageMaker: stop the job after this many seconds of training",
    )
    g.add_argument(
        "--max-wait-s",
        type=int,
        default=0,
        help="SageMaker spot: give up after this many seconds of waiting plus "
        "training (default 2 x --max-run-s)",
    )
    g.add_argument(
        "--volume-gb",
        type=int,
        default=100,
        help="SageMaker: EBS volume per instance (File-mode data, checkpoints)",
    )
    g.add_argument("--region", default="", help="SageMaker: AWS region (default: AWS_REGION)")
    g.add_argument(
        "--sm-root",
        default="/opt/ml",
        help="sagemaker-entry: where the job's /opt/ml lies (for local tests)",
    )


def service_model() -> Any:
    try:
        import botocore.session
    except ImportError:
        raise UserError("--backend sagemaker needs boto3: pip install 'boto3>=1.34'") from None
    return botocore.session.get_session().get_service_model("sagemaker")


def hyperparameters(changed: dict[str, Any], launch_opts: dict[str, Any]) -> dict[str, str]:
    """Config fields as "section.field" -> string (what SageMaker stores), launcher options as
    "launch.name"."""

    def text(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else str(v)

    # data.path stays when it names no folder on this machine ("synthetic", or s3:// which the
    # job streams itself), and checkpoint.dir when it is in S3 (build_request decides how the
    # job reaches it).
    hps = {
        k: text(v)
        for k, v in changed.items()
        if v is not None
        and (
            k not in JOB_SIDE_KEYS
            or (k, v) == ("data.path", "synthetic")
            or (k in ("data.path", "checkpoint.dir") and str(v).startswith("s3://"))
        )
    }
    hps.update({f"launch.{k}": text(v) for k, v in launch_opts.items()})
    for k, v in hps.items():
        if len(v) > 2500:
            raise UserError(
                f"{k} is {len(v)} characters; SageMaker hyperparameters hold at most 2500"
            )
    if len(hps) > 100:
        raise UserError(
            f"{len(hps)} hyperparameters; SageMaker takes at most 100: move "
            "settings into fewer non-default fields"
        )
    return hps


def _channel_s3(spec: str, mode: str) -> dict[str, Any]:
    name, sep, uri = spec.partition("=")
    if not sep or not uri.startswith("s3://") or not name:
        raise UserError(
            f"--input {spec!r} is not CHANNEL=s3://bucket/prefix; e.g. "
            "--input train=s3://my-bucket/data/stdlib"
        )
    return {
        "ChannelName": name,
        "InputMode": mode,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": uri,
                "S3DataDistributionType": "FullyReplicated",
            }
        },
    }


def _channel_fsx(spec: str) -> dict[str, Any]:
    name, sep, rest = spec.partition("=")
    m = FSX.match(rest)
    if not sep or not name or not m:
        raise UserError(
            f"--fsx {spec!r} is not CHANNEL=fs-ID:/MOUNT/PATH[:ro|rw]; e.g. "
            "--fsx train=fs-0123456789abcdef0:/fsx/data/stdlib"
        )
    mode = m.group(3) or ("rw" if name == "checkpoints" else "ro")
    return {
        "ChannelName": name,
        "InputMode": "File",
        "DataSource": {
            "FileSystemDataSource": {
                "FileSystemId": m.group(1),
                "FileSystemAccessMode": mode,
                "FileSystemType": "FSxLustre",
                "DirectoryPath": m.group(2),
            }
        },
    }


def instance_type_problem(name: str, model: Any) -> str:
    """What is wrong with --instance-type ("" = nothing)."""
    known: list[str] = list(model.shape_for("TrainingInstanceType").enum)
    if not name:
        return "--backend sagemaker needs --instance-type, e.g. ml.p5.48xlarge"
    if name not in known:
        hint = nearest(name, known)
        return (
            f"--instance-type {name!r} is not a SageMaker training instance type"
            f"{f'; did you mean {hint}?' if hint else ''} (list: botocore's "
            "TrainingInstanceType, or the SageMaker pricing page)"
        )
    return ""


def option_problems(a: argparse.Namespace, model: Any) -> list[str]:
    """Every missing or malformed job option, each one line: a new user learns them all from
    one dry run, not one per run."""
    problems = [instance_type_problem(a.instance_type, model)]
    if not a.image:
        problems.append(
            "--backend sagemaker needs --image, the URI of a training image with "
            "triaxis installed (e.g. an ECR image built FROM a PyTorch DLC)"
        )
    if not ROLE_ARN.match(a.role or ""):
        problems.append(
            f"--role {a.role!r} is not an IAM role ARN; pass the execution role, "
            "e.g. --role arn:aws:iam::123456789012:role/SageMakerTrainer"
        )
    if not a.output_s3.startswith("s3://"):
        problems.append(
            "--backend sagemaker needs --output-s3 s3://bucket/prefix for the "
            "job's output (model folder, metrics)"
        )
    return [p for p in problems if p]


def refuse(problems: list[str]) -> None:
    """One error line for all `problems` (none: return)."""
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        numbered = " ".join(f"({i}) {p};" for i, p in enumerate(problems, 1))
        raise UserError(f"the SageMaker job has {len(problems)} problems: {numbered[:-1]}")


def build_request(a: argparse.Namespace, hps: dict[str, str], data_path: str) -> dict[str, Any]:
    """The CreateTrainingJob request for the parsed `triaxis launch` options `a`; `data_path`
    is the config's data.path. Every problem found is reported at once (`refuse`)."""
    model = service_model()
    problems = option_problems(a, model)
    name = a.job_name if a.job_name != "triaxis" else f"triaxis-{time.strftime('%Y%m%d-%H%M%S')}"
    if not JOB_NAME.match(name):
        problems.append(
            f"--job-name {name!r}: SageMaker job names are 1-63 letters, digits and "
            "hyphens, starting with a letter or digit"
        )
    channels = []
    for parse, specs in ((lambda s: _channel_s3(s, a.input_mode), a.input), (_channel_fsx, a.fsx)):
        for spec in specs:
            try:
                channels.append(parse(spec))
            except UserError as e:
                problems.append(str(e))
    names = [c["ChannelName"] for c in channels]
    if len(set(names)) != len(names):
        problems.append(f"input channels {names} repeat a name; give each channel one source")
    problems += _data_problems(data_path, names)
    if a.fsx and not (a.subnet and a.security_group):
        problems.append("--fsx needs the file system's VPC: pass --subnet and --security-group")
    hps = dict(hps)
    ckpt_s3 = ""
    try:
        ckpt_s3 = checkpoint_s3(
            a.checkpoint_s3, hps.pop("checkpoint.dir", ""), shared_fsx="checkpoints" in names
        )
    except UserError as e:
        problems.append(str(e))
    if a.nnodes > 1 and not ckpt_s3 and "checkpoints" not in names:
        problems.append(
            f"--nnodes={a.nnodes} with checkpoints in each instance's {CHECKPOINT_LOCAL_PATH}: "
            "every host would hold only its own ranks' shards and no checkpoint could "
            "commit; set checkpoint.dir=s3://bucket/prefix (or --checkpoint-s3), or share a "
            "file system: --fsx checkpoints=fs-ID:/mount/path"
        )
    if a.spot and (a.max_wait_s or 2 * a.max_run_s) < a.max_run_s:
        problems.append(
            f"--max-wait-s={a.max_wait_s} is below --max-run-s={a.max_run_s}; spot "
            "waiting time counts too: set --max-wait-s >= --max-run-s"
        )
    refuse(problems)
    req: dict[str, Any] = {
        "TrainingJobName": name,
        "RoleArn": a.role,
        "AlgorithmSpecification": {
            "TrainingImage": a.image,
            "TrainingInputMode": a.input_mode,
            "ContainerEntrypoint": ENTRYPOINT,
            "MetricDefinitions": [
                {"Name": "train:loss", "Regex": r"step +\d+/\d+ +loss ([0-9.]+)"},
                {"Name": "validation:loss", "Regex": r"validation loss ([0-9.]+)"},
            ],
        },
        "HyperParameters": hps,
        "OutputDataConfig": {"S3OutputPath": a.output_s3},
        "ResourceConfig": {
            "InstanceType": a.instance_type,
            "InstanceCount": a.nnodes,
            "VolumeSizeInGB": a.volume_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": a.max_run_s},
        # Unbuffered: the loss lines reach CloudWatch (and the metric regexes) as they happen.
        "Environment": {"PYTHONUNBUFFERED": "1"},
    }
    if channels:
        req["InputDataConfig"] = channels
    if a.subnet or a.security_group:
        req["VpcConfig"] = {"Subnets": a.subnet, "SecurityGroupIds": a.security_group}
    if ckpt_s3 and a.nnodes == 1:
        # One host: the job writes at local-disk speed and SageMaker mirrors the folder into
        # S3 (deletions too, so checkpoint.keep_last holds there) and back on a restart.
        req["CheckpointConfig"] = {"S3Uri": ckpt_s3, "LocalPath": CHECKPOINT_LOCAL_PATH}
    elif ckpt_s3:
        # Several hosts: each host's mirror would hold only its own ranks' shards (and rank 0
        # could never see the others' to commit), and a CheckpointConfig would copy every
        # checkpoint onto every host at start. Every rank writes its shards straight into S3
        # instead (DCP over s3fs) and rank 0's manifest commits them: one complete copy.
        hps["checkpoint.dir"] = ckpt_s3
    if a.spot:
        wait_s = a.max_wait_s or 2 * a.max_run_s
        req["EnableManagedSpotTraining"] = True
        req["StoppingCondition"]["MaxWaitTimeInSeconds"] = wait_s
    validate(req, model)
    return req


def _data_problems(data_path: str, channels: list[str]) -> list[str]:
    """How the job reaches data.path: the `train` channel, or an s3:// path it streams itself."""
    from triaxis.data.synthetic import SYNTHETIC

    if data_path.startswith("s3://"):
        if "train" in channels:
            return [
                f"data.path={data_path} and the `train` input channel name two data "
                "locations; keep one (the job streams an s3:// data.path itself)"
            ]
        return []
    if data_path != SYNTHETIC and "train" not in channels:
        return [
            f"data.path={data_path} is a folder on this machine, which the job cannot see; "
            "pass --input train=s3://bucket/prefix (the prepared folder, uploaded with "
            "`aws s3 sync`) or --fsx train=fs-ID:/mount/path, or set data.path=s3://... "
            "(streamed from S3 by the job)"
        ]
    return []


def checkpoint_s3(flag: str, config_dir: str, shared_fsx: bool) -> str:
    """The one S3 URI the job's checkpoints go to: --checkpoint-s3 or an s3:// checkpoint.dir
    ("" = none: /opt/ml/checkpoints on the instance, or the shared FSx channel)."""
    if flag and not flag.startswith("s3://"):
        raise UserError(f"--checkpoint-s3 {flag!r} must be an s3:// URI")
    if flag and config_dir and flag.rstrip("/") != config_dir.rstrip("/"):
        raise UserError(
            f"--checkpoint-s3 {flag} and checkpoint.dir={config_dir} name two "
            "checkpoint locations; keep one"
        )
    uri = flag or config_dir
    if uri and shared_fsx:
        raise UserError(
            f"checkpoints would go to {uri} and to the FSx channel `checkpoints`; "
            "keep one (drop --fsx checkpoints=... or the S3 location)"
        )
    return uri


def validate(request: dict[str, Any], model: Any | None = None) -> None:
    """Check the request against botocore's CreateTrainingJob shape, offline."""
    from botocore.validate import ParamValidator

    model = model or service_model()
    shape = model.operation_model("CreateTrainingJob").input_shape
    report = ParamValidator().validate(request, shape)
    if report.has_errors():
        raise UserError(f"the SageMaker request is invalid: {report.generate_report()}")


def submit(request: dict[str, Any], region: str) -> str:
    """Create the training job; returns its ARN. AWS_ENDPOINT_URL redirects (tests: moto)."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise UserError(
            "--backend sagemaker needs boto3: pip install 'boto3>=1.34', or add "
            "--dry-run to print the request"
        ) from None
    session = boto3.session.Session(region_name=region or None)
    if not session.region_name:
        raise UserError("no AWS region: pass --region or set AWS_REGION (or --dry-run)")
    if session.get_credentials() is None:
        raise UserError(
            "no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or run `aws sso login` (or --dry-run)"
        )
    try:
        resp = session.client("sagemaker").create_training_job(**request)
    except ClientError as e:
        err = e.response.get("Error", {})
        raise UserError(
            f"SageMaker refused the job: {err.get('Code')}: {err.get('Message')}"
        ) from None
    except BotoCoreError as e:
        raise UserError(f"could not reach SageMaker: {e}") from None
    return str(resp["TrainingJobArn"])
