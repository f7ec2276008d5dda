"""Inside a SageMaker training job: read the job's environment, then launch as on any node.

SageMaker describes the job twice: as files under /opt/ml (resourceconfig.json: hosts and this
host; hyperparameters.json; one folder per input channel) and, in images with the SageMaker
training toolkit, as SM_* environment variables. Both are read, the variables first:

    hosts, this host      SM_HOSTS, SM_CURRENT_HOST     -> nnodes; rendezvous on sorted(hosts)[0]
    processes per host    launch.nproc_per_node, else SM_NUM_GPUS, else 1
    data                  SM_CHANNEL_TRAIN              -> data.path (else the config's: an
                                                           s3:// data.path is streamed)
    checkpoints           an s3:// checkpoint.dir (a multi-host job: every rank writes there),
                          else channel `checkpoints` (shared FSx), else /opt/ml/checkpoints
                          (mirrored to S3 by SageMaker) -> checkpoint.dir, resume=auto
    run folder            SM_MODEL_DIR (uploaded at the end) -> train.run_dir
    config                the hyperparameters "section.field" -> --section.field=value
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triaxis.errors import UserError

RDZV_PORT = 29400


def in_sagemaker_job(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get("SM_CURRENT_HOST") and environ.get("SM_HOSTS"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _text(v: Any) -> str:
    # The toolkit JSON-decodes hyperparameters ("4" -> 4, "true" -> true): back to config text.
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


@dataclass
class SageMakerEnv:
    hosts: list[str]
    current_host: str
    num_gpus: int
    channels: dict[str, str]
    hyperparameters: dict[str, str]
    model_dir: str
    checkpoint_dir: str

    @property
    def node_rank(self) -> int:
        return sorted(self.hosts).index(self.current_host)

    @classmethod
    def read(cls, environ: Mapping[str, str], root: Path) -> SageMakerEnv:
        config = root / "input" / "config"
        resource = _read_json(config / "resourceconfig.json") or {}
        hosts = (
            json.loads(environ["SM_HOSTS"]) if environ.get("SM_HOSTS") else resource.get("hosts")
        )
        current = environ.get("SM_CURRENT_HOST") or resource.get("current_host")
        if not hosts or not current:
            raise UserError(
                f"--backend sagemaker-entry runs inside a SageMaker training job: "
                f"neither SM_HOSTS / SM_CURRENT_HOST nor {config}/resourceconfig.json"
                " describes one; use --backend local here"
            )
        if current not in hosts:
            raise UserError(f"SM_CURRENT_HOST={current!r} is not in SM_HOSTS={hosts}")
        hps = (
            json.loads(environ["SM_HPS"])
            if environ.get("SM_HPS")
            else _read_json(config / "hyperparameters.json") or {}
        )
        channels = {
            k[len("SM_CHANNEL_") :].lower(): v
            for k, v in environ.items()
            if k.startswith("SM_CHANNEL_")
        }
        data_root = root / "input" / "data"
        if not channels and data_root.is_dir():
            channels = {p.name: str(p) for p in data_root.iterdir() if p.is_dir()}
        gpus = environ.get("SM_NUM_GPUS")
        if gpus is None:
            from triaxis.hardware import local_gpu_count

            gpus = str(local_gpu_count())
        hps = {k: _text(v) for k, v in hps.items()}
        remote = hps.get("checkpoint.dir", "")
        return cls(
            hosts=list(hosts),
            current_host=current,
            num_gpus=int(gpus),
            channels=channels,
            hyperparameters=hps,
            model_dir=environ.get("SM_MODEL_DIR", str(root / "model")),
            checkpoint_dir=remote
            if remote.startswith("s3://")
            else channels.get("checkpoints", str(root / "checkpoints")),
        )


def entry_plan(sm: SageMakerEnv) -> dict[str, Any]:
    """What the in-job launcher runs: overrides, processes, nodes, rendezvous."""
    hps = dict(sm.hyperparameters)
    opts = {k[len("launch.") :]: hps.pop(k) for k in list(hps) if k.startswith("launch.")}
    overrides = [f"--{k}={v}" for k, v in hps.items()]
    if "train" in sm.channels:
        overrides.append(f"--data.path={sm.channels['train']}")
    # Spot interruptions and retries restart the job: always continue from the checkpoints
    # SageMaker restored into checkpoint_dir.
    overrides += [
        f"--checkpoint.dir={sm.checkpoint_dir}",
        "--checkpoint.resume=auto",
        f"--train.run_dir={sm.model_dir}",
    ]
    nnodes = len(sm.hosts)
    return {
        "overrides": overrides,
        "nproc_per_node": int(opts.get("nproc_per_node", 0)) or sm.num_gpus or 1,
        "nnodes": nnodes,
        "rdzv_endpoint": f"{sorted(sm.hosts)[0]}:{RDZV_PORT}" if nnodes > 1 else "",
        "max_restarts": int(opts.get("max_restarts", 0)),
        "rdzv_timeout_s": float(opts.get("rdzv_timeout_s", 600)),
    }
