"""`triaxis launch`: one config, launched on this node, on Slurm or on SageMaker.

    --backend local            this node: torchrun standalone, or one node of a multi-node job
    --backend torchrun         the same, for multi-node jobs: c10d rendezvous on --rdzv-endpoint
                               (or MASTER_ADDR / the first Slurm node), elastic --max-restarts
    --backend slurm            an sbatch script, one launcher per node via srun, requeue-safe
    --backend sagemaker        a CreateTrainingJob request, submitted with boto3
    --backend sagemaker-entry  inside a SageMaker job (also chosen when SM_* variables are set):
                               read the job's environment, then as torchrun

Every backend validates the config against the world size first: one clear error on the
submitting machine instead of one per rank, or a failed job hours later. Each backend's code is
in triaxis/launchers/.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from triaxis.errors import UserError
from triaxis.launchers.torchrun import TorchrunSpec, launch_module, log

BACKENDS = ("local", "torchrun", "slurm", "sagemaker", "sagemaker-entry")


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """The launch options beyond --nproc-per-node/--nnodes/--node-rank/--rdzv-endpoint/
    --max-restarts/--cpu (which cli.py registers)."""
    from triaxis.launchers.sagemaker import add_sagemaker_args
    from triaxis.launchers.slurm import add_slurm_args

    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="where to run: this node (local, torchrun), a Slurm job, a SageMaker "
        "training job (sagemaker; sagemaker-entry inside one)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the torchrun command, sbatch script or SageMaker request "
        "instead of running or submitting it",
    )
    p.add_argument(
        "--rdzv-id",
        default="",
        help="job id in the rendezvous store, the same on every node "
        "(default: triaxis; the job id on Slurm)",
    )
    p.add_argument(
        "--rdzv-timeout",
        type=float,
        default=600.0,
        help="seconds the nodes wait for each other before the launch fails",
    )
    p.add_argument(
        "--rdzv-last-call",
        type=float,
        default=30.0,
        help="with --nnodes MIN:MAX: seconds the rendezvous waits for more nodes "
        "once MIN have joined",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="after SIGTERM or Ctrl-C, seconds the workers get to write their final "
        "checkpoint before they are killed (a second Ctrl-C: at once)",
    )
    add_slurm_args(p.add_argument_group("slurm"))
    add_sagemaker_args(p.add_argument_group("sagemaker"))


def _with_defaults(a: argparse.Namespace) -> argparse.Namespace:
    """Fill options a parser without add_launch_args lacks (the plain local launcher)."""
    p = argparse.ArgumentParser(add_help=False)
    add_launch_args(p)
    for k, v in vars(p.parse_args([])).items():
        if not hasattr(a, k):
            setattr(a, k, v)
    return a


def launch(a: argparse.Namespace) -> int:
    from triaxis.config import split_config_args
    from triaxis.launchers.sagemaker_entry import in_sagemaker_job

    a = _with_defaults(a)
    config_path, overrides = split_config_args(a.rest)
    backend = a.backend
    a.min_nnodes, a.nnodes = parse_nnodes(str(a.nnodes))
    if a.min_nnodes < a.nnodes and backend not in ("local", "torchrun"):
        raise UserError(
            f"--nnodes={a.min_nnodes}:{a.nnodes} (elastic) is for --backend "
            f"torchrun or local; {backend} runs a fixed number of nodes: give "
            f"--nnodes={a.nnodes} (a lost node there is handled by --max-restarts "
            "and requeue)"
        )
    if backend == "local" and in_sagemaker_job():
        log("SageMaker job environment found (SM_HOSTS, SM_CURRENT_HOST): as sagemaker-entry")
        backend = "sagemaker-entry"
    if backend == "slurm":
        return launch_slurm(a, config_path, overrides)
    if backend == "sagemaker":
        return launch_sagemaker(a, config_path, overrides)
    if backend == "sagemaker-entry":
        return launch_sagemaker_entry(a, config_path, overrides)
    return launch_here(
        config_path,
        overrides,
        nproc_per_node=a.nproc_per_node,
        nnodes=a.nnodes,
        rdzv_endpoint=a.rdzv_endpoint,
        rdzv_id=a.rdzv_id,
        rdzv_timeout_s=a.rdzv_timeout,
        max_restarts=a.max_restarts,
        cpu=a.cpu,
        dry_run=a.dry_run,
        min_nnodes=a.min_nnodes,
        rdzv_last_call_s=a.rdzv_last_call,
        shutdown_timeout_s=a.shutdown_timeout,
    )


def parse_nnodes(text: str) -> tuple[int, int]:
    """`--nnodes N` -> (N, N); `MIN:MAX` -> (MIN, MAX), an elastic range."""
    lo, sep, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise UserError(
            f"--nnodes={text!r} is not N or MIN:MAX (e.g. --nnodes 4, or "
            "--nnodes 2:4 to go on with 2 of 4 nodes)"
        ) from None
    if not 1 <= low <= high:
        raise UserError(f"--nnodes={text}: need 1 <= MIN <= MAX (e.g. --nnodes 2:4)")
    return low, high


def launch_here(
    config_path: str | None,
    overrides: list[str],
    *,
    nproc_per_node: int,
    nnodes: int,
    rdzv_endpoint: str,
    rdzv_id: str,
    rdzv_timeout_s: float,
    max_restarts: int,
    cpu: bool,
    dry_run: bool,
    min_nnodes: int = 0,
    rdzv_last_call_s: float = 30.0,
    shutdown_timeout_s: float = 60.0,
) -> int:
    """`triaxis train` on nproc_per_node processes of this node (one node of nnodes; with
    min_nnodes < nnodes, of an elastic job that goes on with min_nnodes .. nnodes)."""
    from triaxis.config import load_config
    from triaxis.hardware import local_gpu_count
    from triaxis.launchers.memory_node import node_keeper, node_tier
    from triaxis.parallel.rules import layout_for_world
    from triaxis.plan.auto import auto_layout
    from triaxis.train.resolve import resolve

    cfg = load_config(config_path, overrides)
    # No torch here: the workers import it; this process only builds their command line.
    gpus = local_gpu_count(not cpu and cfg.train.device != "cpu")
    on_gpu = gpus > 0
    nproc = nproc_per_node or (gpus if on_gpu else 2)
    if nproc_per_node < 0 or nnodes < 1:
        raise UserError(f"--nproc-per-node={nproc_per_node} and --nnodes={nnodes} must be positive")
    if on_gpu and nproc > gpus:
        raise UserError(
            f"--nproc-per-node={nproc} but this node has {gpus} GPUs; use at most that many"
        )
    _, dims, model_args, _, _ = resolve(cfg, nproc * nnodes, auto_layout)
    # The memory tier's keeper: checked now, started after the dry run's exit below.
    tier = node_tier(cfg, model_args, dims, nproc, nnodes, rdzv_endpoint, rdzv_id)
    min_nnodes = min_nnodes or nnodes
    for n in range(min_nnodes, nnodes):
        # After losing nodes the job restarts on n of them: the layout (the planner's for that
        # world with parallel.auto, as the restarted trainer plans it) must hold there too.
        try:
            layout_for_world(cfg, nproc * n, model_args, auto_layout)
        except UserError as e:
            raise UserError(
                f"--nnodes={min_nnodes}:{nnodes} may run on {n} node(s), "
                f"{nproc * n} processes: {e} (give parallel.dp_shard=-1 or "
                "parallel.auto to let the layout follow the world size)"
            ) from None
    if min_nnodes < nnodes and max_restarts < 1:
        raise UserError(
            f"--nnodes={min_nnodes}:{nnodes} goes on after losing a node by "
            "restarting the survivors: give --max-restarts >= 1"
        )
    if not on_gpu:
        overrides = overrides + ["--train.device=cpu"]
        # Share the cores between the CPU workers instead of oversubscribing them.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    spec = TorchrunSpec(
        nproc,
        nnodes,
        rdzv_endpoint,
        rdzv_id or "triaxis",
        rdzv_timeout_s,
        max_restarts,
        gpus=on_gpu,
        min_nnodes=min_nnodes,
        last_call_s=rdzv_last_call_s,
        shutdown_timeout_s=shutdown_timeout_s,
    )
    entry = ["triaxis", "train", *([config_path] if config_path else []), *overrides]
    if tier is None or dry_run:
        return launch_module(spec, entry, dry_run=dry_run)
    with node_keeper(cfg, tier):
        return launch_module(spec, entry)


def launch_slurm(a: argparse.Namespace, config_path: str | None, overrides: list[str]) -> int:
    from triaxis.config import load_config
    from triaxis.launchers.slurm import SlurmJob, render_sbatch, submit
    from triaxis.plan.auto import auto_layout
    from triaxis.train.resolve import resolve

    cfg = load_config(config_path, overrides)
    nproc = a.nproc_per_node or a.gpus_per_node or 1
    if a.nnodes < 1 or nproc < 1 or a.gpus_per_node < 0:
        raise UserError(
            f"--nnodes={a.nnodes}, --nproc-per-node={nproc} and --gpus-per-node="
            f"{a.gpus_per_node} must be positive"
        )
    # The data lies on the shared file system: check it all now.
    resolve(cfg, nproc * a.nnodes, auto_layout)
    train_args = ([str(Path(config_path).resolve())] if config_path else []) + overrides
    job = SlurmJob(
        nnodes=a.nnodes,
        nproc_per_node=nproc,
        workdir=os.getcwd(),
        run_dir=str(Path(cfg.train.run_dir).resolve()),
        train_args=train_args,
        python=a.python,
        gpus_per_node=a.gpus_per_node,
        job_name=a.job_name,
        partition=a.partition,
        account=a.account,
        time_limit=a.time,
        requeue_margin_s=a.requeue_margin_s,
        rdzv_timeout_s=a.rdzv_timeout,
        max_restarts=a.max_restarts,
        sbatch_options=a.sbatch_option,
    )
    script = render_sbatch(job)
    if a.dry_run:
        print(script)
        return 0
    job_id = submit(script, Path(job.run_dir) / "sbatch.sh")
    print(job_id)
    log(
        f"submitted Slurm job {job_id}: {a.nnodes} node(s) x {nproc}; log "
        f"{job.run_dir}/slurm-{job_id}.out"
    )
    return 0


def _changed_fields(cfg: Any) -> dict[str, Any]:
    """The config's non-default fields as {"section.field": value}."""
    from triaxis.config import Config

    default = Config().to_dict()
    return {
        f"{s}.{k}": v
        for s, fields in cfg.to_dict().items()
        for k, v in fields.items()
        if default[s][k] != v
    }


def check_layout_without_data(cfg: Any, world: int) -> None:
    """The layout rules (parallel.rules.check_layout, as the trainer runs them) for data not
    on this machine: the model's vocabulary from the config, not the data."""
    from triaxis.model import build_model_args
    from triaxis.parallel.rules import check_layout

    check_layout(cfg, world, build_model_args(cfg.model))


def launch_sagemaker(a: argparse.Namespace, config_path: str | None, overrides: list[str]) -> int:
    import json

    from triaxis.config import load_config
    from triaxis.launchers import sagemaker

    cfg = load_config(config_path, overrides)
    if cfg.data.sources:  # hyperparameters carry flat section.field values only
        raise UserError(
            "data.sources (a mixture) does not run on --backend sagemaker yet; use the "
            "torchrun or slurm backend, or one data.path"
        )
    model = sagemaker.service_model()
    # The job's own options first, all at once; then the layout on the world they make.
    sagemaker.refuse(sagemaker.option_problems(a, model))
    gpus = a.nproc_per_node or sagemaker_gpus(a.instance_type)
    check_layout_without_data(cfg, gpus * a.nnodes)
    opts: dict[str, Any] = {"max_restarts": a.max_restarts, "rdzv_timeout_s": a.rdzv_timeout}
    if a.nproc_per_node:
        opts["nproc_per_node"] = a.nproc_per_node
    hps = sagemaker.hyperparameters(_changed_fields(cfg), opts)
    request = sagemaker.build_request(a, hps, cfg.data.path)
    if a.dry_run:
        print(json.dumps(request, indent=1))
        return 0
    arn = sagemaker.submit(request, a.region)
    print(arn)
    log(
        f"submitted SageMaker training job {request['TrainingJobName']} "
        f"({a.nnodes} x {a.instance_type})"
    )
    return 0


def sagemaker_gpus(instance_type: str) -> int:
    """GPUs of a SageMaker instance type, from its family and size (the known GPU families)."""
    per_family = {"p4d": 8, "p4de": 8, "p5e": 8, "p5en": 8, "p6-b200": 8, "p6-b300": 8, "p3dn": 8}
    family, _, size = instance_type.removeprefix("ml.").partition(".")
    if family in per_family:
        return per_family[family]
    if family == "p5":
        return 1 if size == "4xlarge" else 8
    if family == "p3":
        return {"2xlarge": 1, "8xlarge": 4, "16xlarge": 8}.get(size, 1)
    if family in ("g4dn", "g5", "g6", "g6e"):
        return {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8}.get(size, 1)
    return 1  # CPU instances (and unknown accelerators): one process; --nproc-per-node says more


def launch_sagemaker_entry(
    a: argparse.Namespace, config_path: str | None, overrides: list[str]
) -> int:
    from triaxis.launchers.sagemaker_entry import SageMakerEnv, entry_plan

    sm = SageMakerEnv.read(os.environ, Path(a.sm_root))
    plan = entry_plan(sm)
    log(
        f"SageMaker host {sm.current_host} ({sm.node_rank + 1} of {len(sm.hosts)}), "
        f"{plan['nproc_per_node']} process(es); data {sm.channels.get('train', '(config)')}, "
        f"checkpoints {sm.checkpoint_dir}, run folder {sm.model_dir}"
    )
    # Options on the command line come last: they beat the job's hyperparameters.
    return launch_here(
        config_path,
        plan["overrides"] + overrides,
        nproc_per_node=a.nproc_per_node or plan["nproc_per_node"],
        nnodes=plan["nnodes"],
        rdzv_endpoint=plan["rdzv_endpoint"],
        rdzv_id=a.rdzv_id or "triaxis",
        rdzv_timeout_s=plan["rdzv_timeout_s"],
        max_restarts=plan["max_restarts"] or a.max_restarts,
        cpu=a.cpu,
        dry_run=a.dry_run,
    )
