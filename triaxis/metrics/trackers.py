"""Experiment trackers (MLflow, Weights & Biases) beside metrics.jsonl, on rank 0 only.

Each tracker gets the records metrics.jsonl gets (its numbers) and the resolved config as params.
A background thread sends them: training only appends to a queue, so a slow or unreachable
tracker never stops or slows a step. An outage warns once and the thread retries the same
record until it goes through; metrics.jsonl is written first and holds everything either way.

A tracker's run identity and the last step it accepted live in RUN_DIR/tracker_<name>.json: a
resumed run reopens the same tracker run and skips the steps the tracker already has (the
steps redone after the checkpoint were logged before the crash). The record in flight when a
process died is asked about on reopening, so MLflow (which keeps duplicates) gets each step once.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from triaxis.config.rules import tracker_problem
from triaxis.errors import UserError

# MLflow's HTTP client retries a dead server for minutes per request by itself; the retry loop
# here replaces that, so that an outage is reported at once and a restart is noticed soon.
_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
RETRY_MAX_S = 30.0
# MLflow's answers to a request it will never take (a bad name or value), unlike an outage.
REFUSED = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST")


def flat_params(config: dict) -> dict[str, str]:
    """{"section.field": value as text} from Config.to_dict(), the way trackers show params."""
    out = {}
    for section, fields in config.items():
        for k, v in fields.items():
            out[f"{section}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return {k: v[:MAX_PARAM_CHARS] for k, v in out.items()}


def numbers(record: dict) -> dict[str, float]:
    """The record's numeric values (a bool counts as 0/1; None, text and `step` do not)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and v is not None
    }


class _State:
    """RUN_DIR/tracker_<name>.json: the tracker's run identity and the last step it accepted
    (with the keys it accepted at that step: validation shares a step with training)."""

    def __init__(self, run_dir: str, name: str):
        self.path = Path(run_dir) / f"tracker_{name}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def has(self, record: dict) -> bool:
        last = self.data.get("last_step")
        if last is None or record["step"] > last:
            return False
        return record["step"] < last or set(numbers(record)) <= set(self.data.get("keys", []))

    def sending(self, record: dict) -> None:
        """Note the record about to go out: a kill between the tracker taking it and `accepted`
        leaves it here, and the reopened run asks the tracker whether it landed."""
        self.data["sending"] = {"step": record["step"], "keys": sorted(numbers(record))}
        self.save()

    def accepted(self, record: dict) -> None:
        keys = set(numbers(record))
        if record["step"] == self.data.get("last_step"):
            keys |= set(self.data.get("keys", []))
        self.data["last_step"], self.data["keys"] = record["step"], sorted(keys)
        self.data.pop("sending", None)
        self.save()


class MLflowBackend:
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict, state: _State):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.params, self.state = params, state
        self.client = None

    def open(self) -> None:
        for k, v in _MLFLOW_ENV.items():
            os.environ.setdefault(k, v)
        if self.uri.startswith("file:"):  # MLflow 3 refuses its file store unless told
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        run_id = self.state.data.get("run_id")
        if run_id:
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            self._settle(client, run_id)
        else:
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
            run = client.create_run(exp_id, run_name=self.run_name)
            run_id = run.info.run_id
            self.state.data.update(run_id=run_id, experiment_id=exp_id, tracking_uri=self.uri)
            self.state.save()
        # Params are immutable in MLflow: a resumed run adds the ones it lacks and keeps the rest.
        new = [Param(k, v) for k, v in self.params.items() if k not in run.data.params]
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params
            client.log_batch(run_id, params=new[i : i + 100])
        self.client, self.run_id = client, run_id

    def _settle(self, client, run_id: str) -> None:
        """MLflow keeps every value it is sent, so the record a killed run was sending is sent
        again only if MLflow does not have it."""
        sending = self.state.data.get("sending")
        if not sending or not sending["keys"]:
            return
        history = client.get_metric_history(run_id, sending["keys"][0])
        if any(m.step == sending["step"] for m in history):
            self.state.accepted({"step": sending["step"], **dict.fromkeys(sending["keys"], 0.0)})

    def log(self, record: dict, wall_ms: int) -> None:
        from mlflow.entities import Metric

        step = record["step"]
        metrics = [Metric(k, v, wall_ms, step) for k, v in numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id)


class WandbBackend:
    name = "wandb"

    def __init__(self, project, entity, mode, run_dir, run_name, params, state: _State):
        self.project, self.entity, self.mode = project, entity, mode
        self.run_dir, self.run_name, self.params, self.state = run_dir, run_name, params, state
        self.run = None

    def open(self) -> None:
        import wandb

        run_id = self.state.data.get("run_id")
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            self.state.data.update(run_id=run_id, project=self.project)
            self.state.save()
        self.run = wandb.init(
            project=self.project,
            entity=self.entity or None,
            mode=self.mode,
            id=run_id,
            resume="allow",
            name=self.run_name,
            dir=self.run_dir,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.config.update(self.params, allow_val_change=True)

    def log(self, record: dict, wall_ms: int) -> None:
        self.run.log(numbers(record), step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class Tracker:
    """One backend behind a queue and a sending thread. `log` never blocks on the backend."""

    def __init__(self, backend, flush_s: float, warn=None, backlog=()):
        self.backend, self.flush_s = backend, flush_s
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        now = int(time.time() * 1000)
        self.queue: collections.deque = collections.deque((r, now) for r in backlog)
        self.cond = threading.Condition()
        self.closing = False
        self.failing = False
        self.dead = False  # the tracker refused the run itself
        self.thread = threading.Thread(target=self._run, name=f"tracker-{backend.name}")
        self.thread.daemon = True  # a tracker never keeps a finished job alive
        self.thread.start()

    def log(self, record: dict) -> None:
        with self.cond:
            if self.dead:
                return
            self.queue.append((record, int(time.time() * 1000)))
            self.cond.notify()

    def _retry(self, what, attempt: int) -> bool:
        """Run `what`; on failure warn once per outage and back off. True once it went through."""
        try:
            what()
        except Exception as e:  # a tracker's outage is never the run's failure
            if getattr(e, "error_code", None) in REFUSED:
                raise  # the tracker answered no: retrying the same request cannot help
            if not self.failing:
                self.failing = True
                self.warn(
                    f"{self.backend.name} tracker unreachable ({type(e).__name__}: "
                    f"{str(e)[:200]}); retrying in the background, metrics.jsonl has every record"
                )
            with self.cond:  # while closing, retry every second until the flush deadline
                self.cond.wait(min(1.0 if self.closing else RETRY_MAX_S, 0.5 * 2**attempt))
            return False
        if self.failing:
            self.failing = False
            self.warn(f"{self.backend.name} tracker reachable again; sending what was queued")
        return True

    def _run(self) -> None:
        attempt = 0
        try:
            while not self._retry(self.backend.open, attempt):
                attempt += 1
                if self._gave_up():
                    return
        except Exception as e:
            self.warn(f"{self.backend.name} tracker refused the run ({e}); not tracking it")
            with self.cond:
                self.dead = True
                self.queue.clear()
            return
        attempt = 0
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    break
                record, wall_ms = self.queue[0]
            if self.backend.state.has(record):  # a resumed run redoes steps the tracker has
                self.queue.popleft()
                continue
            self.backend.state.sending(record)
            try:
                sent = self._retry(lambda: self.backend.log(record, wall_ms), attempt)
            except Exception as e:
                self.warn(f"{self.backend.name} tracker refused step {record['step']}: {e}")
                sent = True  # dropped there; metrics.jsonl has it
            if sent:
                self.queue.popleft()
                self.backend.state.accepted(record)
                attempt = 0
            else:
                attempt += 1
                if self._gave_up():
                    return
        self._retry(self.backend.close, 0)

    def _gave_up(self) -> bool:
        return self.closing and time.monotonic() > self.deadline

    def close(self) -> None:
        """Send what is queued, waiting at most flush_s for an unreachable tracker."""
        self.deadline = time.monotonic() + self.flush_s
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(self.flush_s + 5)
        if self.queue:
            self.warn(
                f"{self.backend.name} tracker: {len(self.queue)} record(s) not sent after "
                f"{self.flush_s:g} s (metrics.tracker_flush_s); they are in metrics.jsonl"
            )


def open_trackers(cfg, run_dir: str, warn=None) -> list[Tracker]:
    """The trackers the config asks for (rank 0 calls this). Missing packages are one line."""
    mc = cfg.metrics
    if problem := tracker_problem(mc):
        raise UserError(problem)
    params = flat_params(cfg.to_dict())
    name = mc.tracker_run_name or Path(run_dir).resolve().name
    logged = logged_records(run_dir)
    trackers = []
    if mc.mlflow:
        state = _State(run_dir, "mlflow")
        backend = MLflowBackend(mc.mlflow, mc.mlflow_experiment, name, params, state)
        backlog = [r for r in logged if not state.has(r)]
        trackers.append(Tracker(backend, mc.tracker_flush_s, warn, backlog))
    if mc.wandb:
        state = _State(run_dir, "wandb")
        backend = WandbBackend(
            mc.wandb, mc.wandb_entity, mc.wandb_mode, run_dir, name, params, state
        )
        backlog = [r for r in logged if not state.has(r)]
        trackers.append(Tracker(backend, mc.tracker_flush_s, warn, backlog))
    return trackers


def logged_records(run_dir: str) -> list[dict]:
    """What metrics.jsonl holds already: a killed process's queue died with it, so a resumed
    run first sends the records its tracker never accepted (those after its last step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the half-written last line of a killed run
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out
