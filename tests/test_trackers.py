"""MLflow and W&B trackers with the real packages: what metrics.jsonl gets, the config as
params, a resumed run continuing the same tracker run without duplicated steps, and a tracking
server outage that loses nothing (tests/wandb_files.py reads W&B's offline run files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dist import WAIT_S, free_port
from triaxis.config import Config
from triaxis.config.rules import validate
from triaxis.errors import UserError
from triaxis.metrics.logger import MetricsWriter

pytest.importorskip("mlflow")


def records(steps, val_at=()):
    out = []
    for s in steps:
        out.append(
            {"step": s, "loss": 10.0 / s, "lr": 1e-3, "mfu": None, "grad_clipped": s % 2 == 0}
        )
        if s in val_at:
            out.append({"step": s, "val_loss": 20.0 / s})
    return out


def write(run_dir, cfg, recs, warn=None):
    """One process's records. A loaded machine can take long to start a tracker (W&B spawns a
    service), so the flush waits as long as any wait in the tests; any warning fails the test
    unless the test collects them itself."""
    cfg.metrics.tracker_flush_s = max(cfg.metrics.tracker_flush_s, WAIT_S)
    warnings: list[str] = []
    w = MetricsWriter(str(run_dir), True, False, cfg, warn or warnings.append)
    for r in recs:
        w.write(r)
    w.close()
    assert not warnings, warnings


def history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def state(run_dir, name):
    return json.loads((Path(run_dir) / f"tracker_{name}.json").read_text())


def test_mlflow_file_store_resume_continues_the_run_without_duplicates(tmp_path):
    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = Config()
    cfg.metrics.mlflow, cfg.train.steps = uri, 15
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write(run_dir, cfg, records(range(1, 11), val_at=(10,)))
    run_id = state(run_dir, "mlflow")["run_id"]
    # The resume redoes steps 6..10 from a checkpoint at 5, then goes on to 15.
    write(run_dir, cfg, records(range(6, 16), val_at=(10, 15)))
    assert state(run_dir, "mlflow")["run_id"] == run_id
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("triaxis")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    assert sorted(history(uri, run_id, "loss")) == [(s, 10.0 / s) for s in range(1, 16)]
    assert sorted(history(uri, run_id, "val_loss")) == [(10, 2.0), (15, 20.0 / 15)]
    assert sorted(history(uri, run_id, "grad_clipped")) == [
        (s, float(s % 2 == 0)) for s in range(1, 16)
    ]
    assert history(uri, run_id, "mfu") == []  # None is not a number
    run = client.get_run(run_id)
    assert run.data.params["train.steps"] == "15"
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 10 + 1 + 10 + 2  # metrics.jsonl keeps every record as before


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in ("mlflow", "wandb") else real(n, *a)
    )
    for field, extra in (("mlflow", "triaxis[mlflow]"), ("wandb", "triaxis[wandb]")):
        cfg = Config()
        setattr(cfg.metrics, field, "file:/x" if field == "mlflow" else "proj")
        with pytest.raises(UserError) as e:
            validate(cfg)
        assert extra in str(e.value) and "\n" not in str(e.value)


def test_hang_watchdog_must_fire_before_the_collective_timeout():
    cfg = Config()
    validate(cfg)  # the defaults satisfy the rule
    assert 0 < cfg.train.hang_timeout_s < cfg.train.dist_timeout_s
    cfg.train.hang_timeout_s = 1800.0
    with pytest.raises(UserError, match=r"hang_timeout_s=1800 is not below .*dist_timeout_s=600"):
        validate(cfg)
    cfg.train.dist_timeout_s = 3600.0
    validate(cfg)
    cfg.train.hang_timeout_s, cfg.train.dist_timeout_s = 0.0, 600.0  # watchdog off
    validate(cfg)


def start_server(store: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_ALLOW_FILE_STORE="true")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"file:{store}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and its workers
    proc.wait(timeout=WAIT_S)


def wait_for(cond, what):
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.slow
def test_mlflow_server_outage_warns_once_and_loses_nothing(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path / "store", port)
    cfg = Config()
    cfg.metrics.mlflow, cfg.metrics.tracker_flush_s = uri, WAIT_S
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    warnings: list[str] = []
    w = MetricsWriter(str(run_dir), True, False, cfg, warnings.append)
    try:
        for r in records(range(1, 4)):
            w.write(r)
        st = run_dir / "tracker_mlflow.json"
        wait_for(lambda: st.exists() and state(run_dir, "mlflow").get("last_step") == 3, "sent")
        stop_server(server)
        for r in records(range(4, 8)):
            w.write(r)  # a queue append: training goes on while the server is down
        wait_for(lambda: warnings, "an outage warning")
        assert "unreachable" in warnings[0]
        time.sleep(3)  # several retries fail meanwhile
        assert sum("unreachable" in m for m in warnings) == 1
        assert state(run_dir, "mlflow")["last_step"] == 3
        server = start_server(tmp_path / "store", port)
        for r in records(range(8, 10)):
            w.write(r)
        w.close()  # flushes the queue into the restarted server
        assert any("reachable again" in m for m in warnings)
        run_id = state(run_dir, "mlflow")["run_id"]
        assert sorted(history(uri, run_id, "loss")) == [(s, 10.0 / s) for s in range(1, 10)]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == list(range(1, 10))
    finally:
        if server.poll() is None:
            stop_server(server)


@pytest.mark.slow
def test_wandb_offline_resume_continues_the_run_without_duplicates(tmp_path):
    pytest.importorskip("wandb")
    from tests.wandb_files import run_files_through

    cfg = Config()
    cfg.metrics.wandb, cfg.metrics.wandb_mode, cfg.train.steps = "proj", "offline", 8
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write(run_dir, cfg, records(range(1, 6), val_at=(5,)))
    write(run_dir, cfg, records(range(3, 9)))  # resumed from a checkpoint at step 2
    run_id = state(run_dir, "wandb")["run_id"]
    ids, config, rows = run_files_through(run_dir, 8, WAIT_S)
    assert ids == {run_id}
    assert config["train.steps"] == "8"
    loss = [(step, row["loss"]) for step, row in rows if "loss" in row]
    assert loss == [(s, 10.0 / s) for s in range(1, 9)]
    assert [(step, row["val_loss"]) for step, row in rows if "val_loss" in row] == [(5, 4.0)]


def mlflow_run(tmp_path) -> tuple[str, Config, Path]:
    """(a file-store MLflow URI, a config tracking to it, an empty run folder)."""
    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = Config()
    cfg.metrics.mlflow = uri
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return uri, cfg, run_dir


def test_records_a_killed_run_never_sent_go_out_on_resume(tmp_path):
    """The first process dies with steps 4..5 still queued: they are in metrics.jsonl only."""
    uri, cfg, run_dir = mlflow_run(tmp_path)
    write(run_dir, cfg, records(range(1, 4)))
    plain = MetricsWriter(str(run_dir), True, False)  # metrics.jsonl only, as if unsent
    for r in records(range(4, 6)):
        plain.write(r)
    write(run_dir, cfg, records(range(5, 8)))  # resumed from a checkpoint at step 4
    run_id = state(run_dir, "mlflow")["run_id"]
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    assert sorted(history(uri, run_id, "loss")) == [(s, 10.0 / s) for s in range(1, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("landed", [True, False])
def test_the_record_a_killed_run_was_sending_is_sent_once(tmp_path, landed):
    """Killed after MLflow took step 4 (or before) but before the state file said so."""
    uri, cfg, run_dir = mlflow_run(tmp_path)
    write(run_dir, cfg, records(range(1, 4)))
    plain = MetricsWriter(str(run_dir), True, False)  # metrics.jsonl has step 4
    (step4,) = records([4])
    plain.write(step4)
    run_id = state(run_dir, "mlflow")["run_id"]
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from triaxis.metrics.trackers import _State, numbers

    if landed:
        metrics = [Metric(k, v, 0, 4) for k, v in numbers(step4).items()]
        MlflowClient(uri).log_batch(run_id, metrics=metrics)
    st = _State(str(run_dir), "mlflow")
    st.sending(step4)
    write(run_dir, cfg, records(range(5, 7)))  # resumed from a checkpoint at step 4
    assert sorted(history(uri, run_id, "loss")) == [(s, 10.0 / s) for s in range(1, 7)]
    assert "sending" not in state(run_dir, "mlflow")


@pytest.mark.slow
def test_a_restarted_two_rank_job_continues_one_mlflow_run(byte_data, tmp_path):
    """rank 1 SIGKILLs itself before step 6; the launcher restarts the job from the step-4
    checkpoint. Rank 0 alone tracks; MLflow has every step once, as metrics.jsonl has them."""
    from tests.helpers import losses, train_args, triaxis

    uri = f"file:{tmp_path / 'mlruns'}"
    run = tmp_path / "run"
    args = ["launch", "--nproc-per-node", 2, "--max-restarts", 1]
    extra = ["--train.steps=8", "--checkpoint.interval=2", f"--metrics.mlflow={uri}"]
    env = {"TRIAXIS_FAULT_KILL": "1:6", "MLFLOW_ALLOW_FILE_STORE": "true"}
    out = triaxis(*args, *train_args(byte_data, run, *extra), env=env, timeout=WAIT_S)
    assert "resumed from" in out.stdout
    run_id = state(run, "mlflow")["run_id"]
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name("triaxis")
    assert len(MlflowClient(uri).search_runs([exp.experiment_id])) == 1
    got = sorted(history(uri, run_id, "loss"))
    assert [s for s, _ in got] == list(range(1, 9))
    want = losses(run)
    for step, value in got:
        assert abs(value - want[step]) <= 1e-6 * abs(want[step]), step


def test_a_record_mlflow_refuses_is_dropped_with_a_warning_and_the_rest_go_on(tmp_path):
    uri, cfg, run_dir = mlflow_run(tmp_path)
    recs = records(range(1, 5))
    recs[1]["bad!name"] = 1.0  # step 2: not a valid MLflow metric name
    warnings: list[str] = []
    write(run_dir, cfg, recs, warnings.append)
    assert [m for m in warnings if "refused step 2" in m] and len(warnings) == 1, warnings
    run_id = state(run_dir, "mlflow")["run_id"]
    assert sorted(history(uri, run_id, "loss")) == [(s, 10.0 / s) for s in (1, 3, 4)]
