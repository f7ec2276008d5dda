"""Commands that do not train start without torch: `triaxis plan`, `layout`, `config`, `--help`
and every launch backend's `--dry-run` (torch's import alone takes seconds). Each command runs
in a fresh interpreter exactly as `python -m triaxis` runs it; at exit the wrapper records which
of the heavy modules were ever imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parity import tiny_train_args

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy")

_WRAPPER = """
import json, runpy, sys
report, sys.argv = sys.argv[1], ["triaxis", *sys.argv[2:]]
try:
    runpy.run_module("triaxis", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
else:
    code = 0
with open(report, "w") as f:
    json.dump({"code": code, "modules": [m for m in HEAVY if m in sys.modules]}, f)
""".replace("HEAVY", repr(HEAVY))


def imported(tmp_path, *args, env: dict | None = None) -> tuple[set[str], str]:
    """The heavy modules `python -m triaxis ARGS` imported, and its stdout; the command must
    succeed."""
    report = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(report), *map(str, args)],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["code"] in (0, None), (args, result, proc.stderr[-3000:])
    return set(result["modules"]), proc.stdout


# Every part of a plan runs (cp, pipeline, the report); 64 GPUs keep it quick.
PLAN_70B = ("plan", "--model", "70b", "--gpus", "64", "--gpu", "h100")


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        PLAN_70B,
        pytest.param((*PLAN_70B, "--json"), marks=pytest.mark.slow),  # the same imports
        ("plan", "--help"),
        (
            "plan",
            "--model",
            "REPO/configs/demo.toml",
            "--gpus",
            "16",
            "--gpu",
            "h100",
            "--seq",
            "512",
        ),
        ("layout", "--nodes", "2", "--tp", "2", "--pp", "2", "--layers", "8"),
        ("config",),
        ("config", "--fields"),
        ("config", "--markdown"),
        ("train", "--help"),
        ("launch", "--help"),
        ("prepare", "--help"),
        ("generate", "--help"),
        ("net", "--help"),
        ("ckpt", "--help"),
        ("import-hf", "--help"),
        ("export-hf", "--help"),
    ],
    ids=" ".join,
)
def test_no_torch_nor_numpy(tmp_path, args):
    args = [str(x).replace("REPO", str(ROOT)) for x in args]
    modules, out = imported(tmp_path, *args)
    assert modules == set(), f"triaxis {' '.join(args)} imported {sorted(modules)}"
    assert out.strip()


def _sagemaker_entry_env(data, tmp_path) -> dict:
    # A one-host job without SM_NUM_GPUS: the entry counts this node's GPUs itself.
    return {
        "SM_HOSTS": '["algo-1"]',
        "SM_CURRENT_HOST": "algo-1",
        "SM_CHANNEL_TRAIN": data,
        "SM_HPS": "{}",
        "SM_MODEL_DIR": str(tmp_path / "model"),
    }


@pytest.mark.parametrize(
    "backend",
    ["local", "local --cpu", "torchrun", "slurm", "sagemaker", "sagemaker-entry"],
)
def test_launch_dry_runs_import_no_torch(byte_data, tmp_path, backend):
    """The dry run checks the config, the data and the layout, and prints the command, script or
    request the real launch would run, all without torch. (numpy may load: the data checks read
    the shards.)"""
    name, *flags = backend.split()
    args = ["launch", "--backend", name, "--dry-run", *flags]
    env = None
    if name == "torchrun":
        args += ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", "127.0.0.1:29400"]
    elif name == "slurm":
        args += ["--nnodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1"]
    elif name == "sagemaker":
        args += [
            "--instance-type",
            "ml.m5.xlarge",
            "--nproc-per-node",
            "2",
            "--image",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/triaxis:1",
            "--role",
            "arn:aws:iam::123456789012:role/triaxis-trainer",
            "--output-s3",
            "s3://bucket/out",
            "--input",
            "train=s3://bucket/data",
        ]
    elif name == "sagemaker-entry":
        args += ["--sm-root", str(tmp_path / "opt_ml")]
        env = _sagemaker_entry_env(byte_data, tmp_path)
    modules, out = imported(tmp_path, *args, *tiny_train_args(byte_data, tmp_path / "run"), env=env)
    assert "torch" not in modules, f"triaxis launch --backend {backend} --dry-run imported torch"
    assert out.strip()  # the command / script / request was printed


def test_mesh_coords_without_numpy_match_numpy():
    """ParallelDims.coords is plain integer arithmetic (layout imports no numpy): the same
    row-major coordinates numpy gives, for every rank of a 4-D mesh."""
    import numpy as np

    from triaxis.parallel.dims import AXES, ParallelDims

    dims = ParallelDims(dp_replicate=3, dp_shard=2, tp=2, pp=2, world_size=24)
    for rank in range(24):
        expect = dict(zip(AXES, (int(c) for c in np.unravel_index(rank, dims.shape))))
        assert dims.coords(rank) == expect
    with pytest.raises(ValueError, match="outside the world"):
        dims.coords(24)


def test_no_gpu_driver_means_no_gpus_and_no_torch(monkeypatch):
    """Without a GPU driver on the node the GPU count is 0 before torch is asked (the dry runs
    above rely on it); with --cpu it is 0 whatever the node has."""
    from triaxis import hardware

    monkeypatch.setattr(hardware, "GPU_DRIVER_PATHS", ("/nonexistent/nvidia",))
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch now raises
    assert hardware.local_gpu_count() == 0
    assert hardware.local_gpu_count(want_gpu=False) == 0
