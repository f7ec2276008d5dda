"""One copy of the layout rules (parallel.rules.check_layout): every launcher backend's dry run
and the trainer refuse the same bad layout with the same line, and an elastic job is checked at
every world size it may run at."""

import pytest

from tests.helpers import SAGEMAKER, command
from tests.parity import tiny_train_args
from triaxis.cli import main
from triaxis.config import load_config
from triaxis.errors import UserError
from triaxis.train.resolve import resolve

BAD_LAYOUTS = {
    "tied embeddings across a pipeline": (
        ["--parallel.pp=2", "--model.tie_embeddings=true"],
        "model.tie_embeddings=true with parallel.pp=2",
    ),
    "too few micro-batches for the schedule": (
        [
            "--parallel.pp=2",
            "--model.tie_embeddings=false",
            "--parallel.pp_schedule=1f1b",
            "--train.micro_batch=8",
        ],
        "pp_schedule=1f1b with pp=2, 2 stages needs at least 2 micro-batches",
    ),
    "degrees that do not divide the world": (
        ["--parallel.tp=3"],
        "world size 2 is not divisible by dp_replicate x tp x pp",
    ),
}

BACKENDS = {  # each runs the layout on 2 ranks
    "local": ["--nproc-per-node", "2"],
    "torchrun": [
        "--backend",
        "torchrun",
        "--nproc-per-node",
        "2",
        "--rdzv-endpoint",
        "127.0.0.1:29499",
    ],
    "slurm": ["--backend", "slurm", "--nproc-per-node", "2"],
    "sagemaker": [*SAGEMAKER, "--nproc-per-node", "2", "--instance-type", "ml.p5.48xlarge"],
}


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in err if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.mark.parametrize("layout", BAD_LAYOUTS)
def test_every_backend_refuses_a_bad_layout_with_the_same_line(layout, byte_data, tmp_path, capsys):
    overrides, message = BAD_LAYOUTS[layout]
    args = tiny_train_args(byte_data, tmp_path, *overrides)
    with pytest.raises(UserError) as trainer_error:  # what the trainer itself says on 2 ranks
        resolve(load_config(None, args), 2)
    lines = {}
    for backend, options in BACKENDS.items():
        assert main(["launch", "--dry-run", *options, *args]) == 2, backend
        lines[backend] = one_error(capsys)
    assert message in str(trainer_error.value)
    assert set(lines.values()) == {f"error: {trainer_error.value}"}, lines


def test_an_elastic_range_is_checked_at_every_world_size_it_may_run_at(byte_data, tmp_path, capsys):
    # 3 nodes x 2: dp=3, 12 / (2 x 3) = 2 micro-batches, a multiple of pp=2. After losing a
    # node, 2 x 2: dp=2, 3 micro-batches, which interleaved-1f1b cannot run with pp=2.
    args = tiny_train_args(
        byte_data,
        tmp_path,
        "--parallel.pp=2",
        "--model.tie_embeddings=false",
        "--parallel.pp_schedule=interleaved-1f1b",
        "--parallel.pp_virtual_stages=2",
        "--train.global_batch=12",
        "--train.micro_batch=2",
    )
    elastic = [
        "launch",
        "--dry-run",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--rdzv-endpoint",
        "127.0.0.1:29499",
    ]
    assert main([*elastic, "--nnodes", "3", *args]) == 0  # fine at the full size
    capsys.readouterr()
    assert main([*elastic, "--nnodes", "2:3", *args]) == 2
    line = one_error(capsys)
    assert "--nnodes=2:3 may run on 2 node(s), 4 processes" in line, line
    assert "needs micro-batches per step (3) to be a multiple of pp=2" in line, line


def test_the_planner_returns_a_new_config():
    from triaxis.config import Config
    from triaxis.model import build_model_args
    from triaxis.parallel.rules import layout_for_world
    from triaxis.plan.auto import auto_layout

    cfg = Config()
    cfg.model.preset, cfg.data.seq_len, cfg.train.global_batch = "tiny", 64, 8
    cfg.parallel.auto = "memory"
    before = cfg.to_dict()
    planned, dims, why = layout_for_world(cfg, 2, build_model_args(cfg.model), auto_layout)
    assert cfg.to_dict() == before and planned is not cfg and planned.parallel is not cfg.parallel
    assert dims.world_size == 2 and "parallel.auto=memory on 2 x" in why
    with pytest.raises(UserError, match="needs the planner"):
        layout_for_world(cfg, 2, build_model_args(cfg.model))


@pytest.mark.slow
def test_train_with_parallel_auto_runs_the_planners_layout(byte_data, tmp_path):
    # `triaxis train` passes the planner down to the trainer (which does not import it).
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.run(
        command(
            "train",
            *tiny_train_args(
                byte_data,
                run,
                "--parallel.auto=memory",
                "--train.steps=2",
                "--train.device=cpu",
                "--checkpoint.interval=0",
            ),
        ),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    chosen = re.search(
        r"parallel\.auto=memory on 1 x cpu: .*? mb=(\d+) ac=(\w+)", proc.stdout + proc.stderr
    )
    assert chosen, proc.stdout + proc.stderr
    # The run folder's config is the one that ran: the planner's layout, not the command line's
    # micro_batch=4.
    written = load_config(str(run / "config.toml"), [])
    assert (written.train.micro_batch, written.parallel.activation_checkpoint) == (
        int(chosen[1]),
        chosen[2],
    )
