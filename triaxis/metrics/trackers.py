"""Experiment trackers (MLflow, Weights & Biases): the records of metrics.jsonl, mirrored.

Rank 0 only, like metrics.jsonl. Each tracker gets exactly the keys and values of a record
(numbers; `step` is the tracker's step), the resolved config once as parameters, and the run's
identity: the tracker's run id is kept in RUN_DIR/trackers.json, so a resumed run logs into the
same tracker run, and steps it already sent (a resume re-trains the steps after its checkpoint)
are not sent twice.

A tracker never holds up training: records go onto a queue that a background thread sends.
When the service is down the thread warns once, keeps the records and retries with backoff;
at the end of the run it waits up to metrics.tracker_flush_s for them, then says how many were
not sent. metrics.jsonl is written before a record reaches the queue: nothing is lost there.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from triaxis.errors import UserError

IDS = "trackers.json"
"""RUN_DIR/trackers.json: {tracker name: {"run_id": ..., "last_step": ...}}."""


def _numbers(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def flat_params(config: dict) -> dict[str, str]:
    """The resolved config as "section.key" -> text (lists as JSON)."""
    out = {}
    for section, values in config.items():
        for k, v in values.items():
            if v is not None:
                out[f"{section}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


class _Ids:
    """RUN_DIR/trackers.json, rewritten through a temporary file (never half-written)."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / IDS
        try:
            self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        except ValueError:
            raise UserError(
                f"{self.path} is not JSON; remove it to start new tracker runs"
            ) from None

    def get(self, name: str) -> dict:
        return dict(self.data.get(name) or {})

    def put(self, name: str, entry: dict) -> None:
        self.data[name] = entry
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


class _Mlflow:
    name = "mlflow"

    def __init__(self, cfg, run_name: str, run_id: str | None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.metrics.mlflow)
        self.experiment, self.run_name, self.run_id = (
            cfg.metrics.mlflow_experiment,
            run_name,
            run_id,
        )

    def start(self, params: dict[str, str]) -> str:
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
            run = self.client.create_run(exp_id, run_name=self.run_name)
            from mlflow.entities import Param

            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes 100 params per call
                self.client.log_batch(run.info.run_id, params=items[i : i + 100])
            self.run_id = run.info.run_id
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        return self.run_id

    def log(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, r["step"]) for r in records for k, v in _numbers(r).items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    name = "wandb"

    def __init__(self, cfg, run_name: str, run_id: str | None, run_dir: str):
        self.cfg, self.run_name, self.run_id, self.run_dir = cfg, run_name, run_id, run_dir
        self.run = None

    def start(self, params: dict[str, str]) -> str:
        import wandb

        m = self.cfg.metrics
        self.run = wandb.init(
            project=m.wandb,
            entity=m.wandb_entity or None,
            mode=m.wandb_mode,
            dir=self.run_dir,
            name=self.run_name,
            id=self.run_id or uuid.uuid4().hex[:8],
            resume="allow",
            config=params,
            # No console capture (it would wrap the run's own output) and no banner.
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_id = self.run.id
        return self.run_id

    def log(self, records: list[dict]) -> None:
        for r in records:
            self.run.log(_numbers(r), step=r["step"])

    def finish(self) -> None:
        self.run.finish()


def open_trackers(cfg, log, is_main: bool) -> Trackers | None:
    """The run's trackers on rank 0, when metrics.mlflow or metrics.wandb asks for one."""
    if not is_main or not (cfg.metrics.mlflow or cfg.metrics.wandb):
        return None
    return Trackers(cfg, cfg.train.run_dir, log, cfg.to_dict())


class Trackers:
    """The trackers a run asked for, behind one queue and one sending thread (rank 0)."""

    def __init__(self, cfg, run_dir: str, log, config: dict):
        self.log, self.flush_s = log, cfg.metrics.tracker_flush_s
        self.ids = _Ids(run_dir)
        name = Path(run_dir).resolve().name
        self.backends: list[Any] = []
        if cfg.metrics.mlflow:
            try:  # a URI MLflow refuses is the user's to fix, before training starts
                self.backends.append(_Mlflow(cfg, name, self.ids.get("mlflow").get("run_id")))
            except Exception as err:  # noqa: BLE001  (MlflowException and friends)
                first = str(err).strip().splitlines()[0] if str(err) else type(err).__name__
                raise UserError(f"metrics.mlflow={cfg.metrics.mlflow}: {first}") from None
        if cfg.metrics.wandb:
            self.backends.append(_Wandb(cfg, name, self.ids.get("wandb").get("run_id"), run_dir))
        self.params = flat_params(config)
        self.queue: queue.Queue = queue.Queue()
        self.warned: set[str] = set()
        self.thread = threading.Thread(target=self._send, name="triaxis-trackers", daemon=True)
        self.thread.start()

    def write(self, record: dict) -> None:
        if "step" in record:
            self.queue.put(dict(record))

    def _retry(self, backend, what: str, fn) -> None:
        """Call fn until it succeeds (or the run ends and the flush time is spent)."""
        wait = 1.0
        while True:
            try:
                fn()
                if backend.name in self.warned:
                    self.log.info(f"{backend.name}: reachable again; sending on")
                    self.warned.discard(backend.name)
                return
            except Exception as err:  # noqa: BLE001  (any outage: never stop training)
                if backend.name not in self.warned:
                    self.warned.add(backend.name)
                    first = str(err).strip().splitlines()[0][:200] if str(err) else type(err)
                    self.log.warn(
                        f"{backend.name}: could not {what} ({first}); training goes on, "
                        "metrics.jsonl has every record, retrying in the background"
                    )
                if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    raise
                time.sleep(wait)
                wait = min(2 * wait, 30.0)

    _give_up_at: float | None = None
    unsent = 0

    def _send(self) -> None:
        # Steps an earlier process of this run already sent: a resume re-trains them (to the
        # same values), and a tracker's step history must not hold them twice.
        sent_through = {b.name: self.ids.get(b.name).get("last_step", 0) for b in self.backends}
        started = {b.name: False for b in self.backends}
        pending: list[dict] = []
        done = False
        while not done:
            item = self.queue.get()
            while item is not None:
                pending.append(item)
                try:
                    item = self.queue.get_nowait()  # batch what piled up meanwhile
                except queue.Empty:
                    break
            done = item is None
            try:
                for b in self.backends:
                    entry = self.ids.get(b.name)
                    if not started[b.name]:
                        self._retry(b, "start its run", lambda b=b: b.start(self.params))
                        started[b.name] = True
                        self.ids.put(b.name, {**entry, "run_id": b.run_id})
                    fresh = [r for r in pending if r["step"] > sent_through[b.name]]
                    if fresh:
                        self._retry(b, "log metrics", lambda b=b, f=fresh: b.log(f))
                        last = max(entry.get("last_step", 0), fresh[-1]["step"])
                        self.ids.put(b.name, {**self.ids.get(b.name), "last_step": last})
                pending = []
            except Exception:  # noqa: BLE001  (the flush time is spent: close() says so)
                self.unsent = len(pending)
                return
        for b in self.backends:
            if started[b.name]:
                try:
                    b.finish()
                except Exception:  # noqa: BLE001  (the records are in; closing is courtesy)
                    pass

    def close(self) -> None:
        """Send what is queued, waiting up to metrics.tracker_flush_s for a tracker that is down."""
        self._give_up_at = time.monotonic() + self.flush_s
        self.queue.put(None)
        self.thread.join(self.flush_s + 60)
        if self.thread.is_alive() or self.unsent:
            self.log.warn(
                f"trackers: records not sent within metrics.tracker_flush_s={self.flush_s:g} s "
                "(the tracker is down); they are all in metrics.jsonl"
            )
