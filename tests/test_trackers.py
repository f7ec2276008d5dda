"""MLflow and W&B trackers with the real packages (issue 27, item 1): the same keys and values
as metrics.jsonl, the config as parameters, one tracker run across a resume with no step twice,
and a tracker outage that neither stops training nor loses a record."""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dist import free_port
from tests.helpers import one_error_line, train_args, triaxis

pytest.importorskip("mlflow", reason="the test extra installs mlflow")
pytest.importorskip("wandb", reason="the test extra installs wandb")


def _jsonl(run) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _expected(run) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of metrics.jsonl's numbers: what a tracker must hold. A resume
    logs its re-trained steps again (same losses, other timings): the tracker keeps the first."""
    out: dict[str, dict[int, float]] = {}
    for r in _jsonl(run):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, {}).setdefault(r["step"], float(v))
    return out


def _mlflow_history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    keys = client.get_run(run_id).data.metrics
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def _assert_mirrors(history: dict, run) -> None:
    want = _expected(run)
    assert set(history) == set(want)
    for k, steps in want.items():
        got = history[k]
        assert [s for s, _ in got] == sorted(steps), k  # every step once, none twice
        for s, v in got:
            assert v == pytest.approx(steps[s], rel=1e-9, abs=1e-12), (k, s)


def _run_id(run, name: str) -> str:
    return json.loads((Path(run) / "trackers.json").read_text())[name]["run_id"]


@pytest.mark.slow
def test_mlflow_file_store_mirrors_metrics_and_resumes_into_the_same_run(byte_data, tmp_path):
    run, uri = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    common = [*train_args(byte_data, run), f"--metrics.mlflow={uri}", "--checkpoint.interval=4"]
    # 6 steps, checkpoint at 4: the resume re-trains 5 and 6, which the tracker already has
    # MLflow 3 keeps its file store behind this switch (docs/metrics.md#trackers)
    env = {"MLFLOW_ALLOW_FILE_STORE": "true"}
    triaxis("train", *common, "--train.steps=6", "--train.val_every=3", env=env)
    first = _run_id(run, "mlflow")
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000006")
    triaxis("train", *common, "--train.steps=8", "--train.val_every=3", env=env)
    assert _run_id(run, "mlflow") == first
    _assert_mirrors(_mlflow_history(uri, first), run)
    from mlflow.tracking import MlflowClient

    got = MlflowClient(tracking_uri=uri).get_run(first)
    assert got.data.params["train.micro_batch"] == "4"
    assert got.data.params["data.seq_len"] == "32"
    assert got.info.run_name == "run" and got.info.status == "FINISHED"


def _records(path: str):
    """The records of a W&B run file (a leveldb-style log of protobuf records; wandb 0.31
    ships no Python reader for it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


@pytest.mark.slow
def test_wandb_offline_mirrors_metrics_and_the_config(byte_data, tmp_path):
    run = tmp_path / "run"
    triaxis(
        "train",
        *train_args(byte_data, run),
        "--metrics.wandb=triaxis-test",
        "--metrics.wandb_mode=offline",
        "--train.steps=4",
        "--train.val_every=2",
        env={"WANDB_SILENT": "true"},
    )
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history: dict[str, list] = {}
    config = {}
    for rec in _records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item
            }
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((items["_step"], v))
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
    _assert_mirrors({k: sorted(v) for k, v in history.items()}, run)
    assert config["train.global_batch"] == "8"
    assert _run_id(run, "wandb") in files[0]


def _mlflow_server(port: int, store: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
            "--default-artifact-root", str(store / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180  # generous: a loaded machine starts it slowly
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    pytest.fail("the MLflow server did not start within 180 s")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_an_mlflow_server_outage_warns_once_and_loses_nothing(byte_data, tmp_path):
    """The server is down when the run starts: one warning, training finishes, and the
    records reach the server once it is back (within metrics.tracker_flush_s)."""
    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    run = tmp_path / "run"
    train = subprocess.Popen(
        [
            sys.executable, "-m", "triaxis", "train", *train_args(byte_data, run),
            f"--metrics.mlflow={uri}", "--train.steps=6", "--metrics.tracker_flush_s=600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() or len(_jsonl(run)) < 6:
            assert train.poll() is None or train.returncode == 0, train.communicate()
            assert time.monotonic() < deadline, "training did not log its 6 steps"
            time.sleep(0.2)
        server = _mlflow_server(port, store)  # training is done: now the server comes up
        try:
            out, err = train.communicate(timeout=600)
            assert train.returncode == 0, err[-3000:]
            assert out.count("mlflow: could not") == 1, out
            _assert_mirrors(_mlflow_history(uri, _run_id(run, "mlflow")), run)
        finally:
            _stop(server)
    finally:
        if train.poll() is None:
            train.kill()


def test_a_tracker_that_is_not_installed_is_one_line(byte_data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    from triaxis.config import load_config
    from triaxis.config.rules import validate
    from triaxis.errors import UserError

    cfg = load_config(None, ["--metrics.wandb=proj"])
    with pytest.raises(UserError, match=r"metrics.wandb is set but wandb is not installed; pip"):
        validate(cfg)


def test_hang_watchdog_must_fire_before_a_collective_times_out(byte_data, tmp_path):
    proc = triaxis(
        "train",
        *train_args(byte_data, tmp_path / "run"),
        "--train.hang_timeout_s=900",
        "--train.dist_timeout_s=600",
        check=False,
    )
    assert proc.returncode == 2
    line = one_error_line(proc.stderr, "train.hang_timeout_s=900", "dist_timeout_s=1800")
    assert "before the hang watchdog" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
