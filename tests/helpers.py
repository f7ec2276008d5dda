"""What the CLI tests share: running `python -m triaxis`, the tiny-model training flags, reading
a run's losses, and the one-line error a user sees for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
"""A subprocess's environment: forked workers hang when OpenMP starts several threads."""


def command(*args) -> list[str]:
    """The argv of `python -m triaxis ARGS` (this interpreter)."""
    return [sys.executable, "-m", "triaxis", *map(str, args)]


def triaxis(
    *args, env: dict | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m triaxis ARGS` in a subprocess, with one OpenMP thread (forked workers hang
    otherwise: shared notes) plus `env` over this process's environment. check: a non-zero exit
    fails the test with the command's stderr tail."""
    proc = subprocess.run(
        command(*args),
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"triaxis {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def train_args(data, run_dir, *extra, seq_len: int = 32) -> list[str]:
    """Flags for a short tiny-model run logging every step. A test's own flags come last, and
    the last value of a flag wins."""
    return [
        "--model.preset=tiny",
        f"--data.path={data}",
        f"--data.seq_len={seq_len}",
        f"--train.run_dir={run_dir}",
        "--train.global_batch=8",
        "--train.micro_batch=4",
        "--train.val_every=0",
        "--metrics.log_every=1",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
        *map(str, extra),
    ]


def losses(run_dir) -> dict[int, float]:
    """{step: loss} from the run's metrics.jsonl; a resumed run re-logs steps: the last wins."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def one_error_line(stderr: str, *words: str) -> str:
    """The whole of stderr is one `error: ...` line (no traceback), naming each of `words`."""
    err = stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


SAGEMAKER_ROLE = "arn:aws:iam::123456789012:role/triaxis-trainer"
SAGEMAKER = [
    "--backend",
    "sagemaker",
    "--image",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com/triaxis:1",
    "--role",
    SAGEMAKER_ROLE,
    "--output-s3",
    "s3://bucket/out",
]
"""`triaxis launch` flags for a SageMaker request (moto, or --dry-run, answers it)."""


def prepare_quietly(**options) -> dict:
    """`triaxis prepare` as a library call (PrepareOptions fields), without its progress lines;
    returns the manifest."""
    from triaxis.data.prepare import PrepareOptions, prepare

    return prepare(PrepareOptions(**options), log=lambda *_: None)


def slow_but_first(*values) -> list:
    """Parametrize values of which the fast lane (`-m "not slow"`) runs the first only: the
    others take the same path through a different door, and the whole suite runs them all."""
    import pytest

    return [values[0], *(pytest.param(v, marks=pytest.mark.slow) for v in values[1:])]


TINY_LLAMA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
"""A tiny Hugging Face LlamaConfig shape (config.json keys) for the import / export / fine-tune
tests; each adds what it needs (vocabulary, RoPE)."""


IN_PROCESS = {
    "model.preset": "tiny",
    "data.seq_len": "32",
    "train.steps": "4",
    "train.global_batch": "8",
    "train.micro_batch": "4",
    "train.device": "cpu",
    "train.val_every": "0",
    "checkpoint.interval": "0",
    "checkpoint.save_final": "false",
    "metrics.log_every": "2",
    "metrics.tensorboard": "false",
    "metrics.progress": "false",
}
"""A 4-step tiny run, quiet, no checkpoints: what in-process Trainer tests start from."""


def in_process_trainer(data: str, run_dir, **values: str):
    """A Trainer in this process (or in each forked worker) for IN_PROCESS's run with `values`
    ({"dotted.key": "text"}) on top."""
    from triaxis.config import load_config
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    values = {**IN_PROCESS, "data.path": data, "train.run_dir": str(run_dir), **values}
    cfg = load_config(None, [f"--{k}={v}" for k, v in values.items()])
    return Trainer(cfg, init_distributed("cpu"))


def final_weights(ckpt_dir) -> dict:
    """The model weights of the newest committed checkpoint under ckpt_dir, as plain tensors."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from triaxis.checkpoint import manifest as mf

    last = mf.list_checkpoints(str(ckpt_dir))[-1].path
    out = Path(last).parent / "final.pt"
    dcp_to_torch_save(last, out)
    return torch.load(out, weights_only=False)["model"]
