"""Sharded checkpoints of the whole training state with torch.distributed.checkpoint (DCP).

State: model and AdamW state (keys = the single-device parameter names, so any layout loads any
checkpoint: DCP reshards on load), LR-schedule position, step, data cursor, RNG state.
Every rank writes its own shards, checksumming them as they are written, then a sidecar with
those checksums; rank 0 commits the checkpoint by writing the manifest last (manifest.py).
Async saves stage the state in host memory (the only part that blocks training) and write in a
background thread.

The commit protocol is symmetric: every rank runs the same collectives in the same order,
whoever finishes first. A pending save is concluded at a fixed point of the loop (`poll` after
each step, `wait` before the next save and at the end): the ranks first agree, in one small
collective on a group of their own, whether every rank's write is done; only then do they agree
on success, rank 0 commits, and all agree on the commit. `pending` is kept or dropped by all
ranks together. Transient storage errors are retried with backoff for checkpoint.retry_s (the
ranks agree on each retry); a save that still fails is skipped with a warning, and the run stops
after checkpoint.max_failed_saves failures in a row (how a failure is judged: save_errors.py).
Resuming (finding, checking and loading a checkpoint) is the Resuming half, dcp_load.py.
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from triaxis import storage
from triaxis.checkpoint import assets, dcp_io
from triaxis.checkpoint import manifest as mf
from triaxis.checkpoint.dcp_load import Resuming
from triaxis.checkpoint.save_errors import (
    FailedElsewhere,
    is_transient,
    outcome,
    rank_delays,
    short,
)
from triaxis.checkpoint.staging import ReusedStaging
from triaxis.errors import UserError
from triaxis.parallel.host import host_all_reduce, new_host_group

# A retried save writes over its own partial files.
warnings.filterwarnings("ignore", message="Detected an existing checkpoint in")


class Checkpointer(Resuming):
    """Saves (here) and resumes (dcp_load.Resuming) the whole training state."""

    def __init__(
        self,
        root: str,
        model,
        optimizer,
        scheduler,
        model_args,
        layout: dict,
        ckpt_cfg,
        rank: int,
        world_size: int,
        meta: dict,
        log,
        asset_files: dict[str, bytes] | None = None,
    ):
        self.root = root
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.model_args = dataclasses.asdict(model_args)
        self.layout, self.cfg = layout, ckpt_cfg
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.meta, self.log = meta, log
        # The tokenizer files every checkpoint carries (assets.py), written by rank 0.
        self.assets = (asset_files or {}) if rank == 0 else {}
        self.pending: tuple[str, dict, Future] | None = None
        self.writes = ThreadPoolExecutor(max_workers=1)
        self.staging = ReusedStaging()  # async saves' host copy, reused save after save
        # Two gloo groups of our own: `group` carries the writes' collectives (DCP's plan and
        # our retry agreement), in the background thread during an async save; `ctl` carries
        # the main thread's agreement on finishing a save. Neither ever interleaves with the
        # training collectives, nor with each other.
        on = dist.is_initialized()
        self.group = new_host_group("checkpoint_writes") if on else None
        self.ctl = new_host_group("checkpoint_agreement") if on else None
        self.blocking_s: list[float] = []
        self.failed_saves = 0
        self.written: set[str] = set()  # checkpoints this run committed (it may replace them)
        self.delays = rank_delays(rank)
        # Called as on_commit(folder, step, group) on every rank after each commit (the run's
        # Hugging Face folder, checkpoint.hf: triaxis/hf/run_output.py, set by train/run.py).
        self.on_commit = None

    def _prepare(self, folder: str, block: bool) -> bool:
        """Rank 0 clears leftovers of an interrupted save of this step, but never a committed
        checkpoint this run did not write; all ranks agree before anyone writes. False: the
        storage is unreachable, this save is skipped (counted as failed)."""
        err: BaseException | None = None
        if self.is_main:
            try:
                if storage.exists(storage.join(folder, mf.META)) and folder not in self.written:
                    err = UserError(
                        f"checkpoint {folder} already exists and this run did not "
                        "write it; refusing to replace it. Point "
                        "--checkpoint.dir elsewhere"
                    )
                else:
                    storage.remove(folder)
            except BaseException as e:  # agreed on below
                err = e
        failed = [o for o in self._gather(outcome(err), self.ctl) if o is not None]
        if failed:
            self._failed(folder, failed, err, last_chance=block)
            return False
        return True

    def save(
        self, step: int, cursor: int, block: bool = False, loop_state: dict | None = None
    ) -> str:
        """Save the state after `step`; async unless `block` or async is off. `loop_state`
        (JSON-able: the training loop's own carried state) goes into the manifest."""
        self.wait()  # one save in flight at a time
        folder = mf.step_dir(self.root, step)
        t0 = time.perf_counter()
        if not self._prepare(folder, block):
            self.blocking_s.append(time.perf_counter() - t0)
            return folder
        state = self._state()
        state["train"] = {
            "step": step,
            "cursor": cursor,
            "scheduler": self.scheduler.state_dict()["last_epoch"],
            "rng": torch.get_rng_state(),
        }
        writer = dcp_io.writer(folder)
        meta = {
            "step": step,
            "cursor": cursor,
            "model": self.model_args,
            "layout": self.layout,
            "world_size": self.world_size,
            **self.meta,
            "loop_state": loop_state or {},
        }
        if self.cfg.async_save and not block:
            staged = self.staging.stage(state, writer)  # the host copy: all that blocks training
            self.pending = (folder, meta, self.writes.submit(self._write, staged, writer, folder))
            self.blocking_s.append(time.perf_counter() - t0)
            return folder
        fut: Future = Future()
        try:
            fut.set_result(self._write(state, writer, folder))
        except BaseException as err:  # concluded below, the same way on every rank
            fut.set_exception(err)
        self.pending = (folder, meta, fut)
        self._conclude(last_chance=block)  # a final or preemption save has no next interval
        self.blocking_s.append(time.perf_counter() - t0)
        return folder

    def _write(self, state: dict, writer, folder: str) -> None:
        """Write this rank's files and sidecar; transient failures are retried, every rank
        retrying together (DCP's save is collective), for checkpoint.retry_s."""
        deadline = time.monotonic() + self.cfg.retry_s
        backoff_s = 1.0
        while True:
            err = None
            writer.digests.clear()  # what a failed attempt wrote is rewritten or not ours
            try:
                time.sleep(self.delays.get("write", 0))
                with dcp_io.full_disk_is_a_user_error(folder):
                    dcp.save(state, storage_writer=writer, process_group=self.group)
                    carried = assets.write(folder, self.assets)
                    time.sleep(self.delays.get("sidecar", 0))
                    mf.write_sidecar(folder, self.rank, {**writer.digests, **carried})
            except BaseException as e:  # agreed on below
                err = e
            retry = (
                err is not None and is_transient(err) and time.monotonic() + backoff_s < deadline
            )
            verdicts = self._gather((err is not None, retry), self.group)
            if not any(failed for failed, _ in verdicts):
                return
            if not all(r for failed, r in verdicts if failed):
                if err is not None:
                    raise err
                raise FailedElsewhere()
            if self.is_main:
                self.log.warn(
                    f"checkpoint {folder}: storage error ({short(err)}); retrying "
                    f"in {backoff_s:.0f}s (up to checkpoint.retry_s="
                    f"{self.cfg.retry_s:g})"
                )
            time.sleep(backoff_s * (0.75 + 0.5 * random.random()))
            backoff_s = min(2 * backoff_s, 30.0)

    def poll(self) -> str | None:
        """Conclude a finished async save; returns the checkpoint committed, if any. Cheap:
        one tiny collective while a save is pending, none otherwise."""
        if self.pending is None:
            return None
        time.sleep(self.delays.get("poll", 0))
        not_done = torch.tensor([0 if self.pending[2].done() else 1])
        if self.ctl is not None:
            host_all_reduce(not_done, self.ctl)
        if int(not_done):
            return None  # some rank is still writing: every rank keeps `pending`
        return self._conclude(last_chance=False)

    def wait(self) -> None:
        """Block until a pending async save is written and concluded (everywhere)."""
        if self.pending is None:
            return
        try:
            self.pending[2].exception()  # wait for this rank's write, whatever its outcome
        except BaseException:
            pass
        self._conclude(last_chance=False)

    def _conclude(self, last_chance: bool) -> str | None:
        """Every rank's write is done: agree on the outcome, commit (rank 0), agree on the
        commit. Runs on every rank, in the same order."""
        folder, meta, fut = self.pending
        self.pending = None
        err = fut.exception()
        failed = [o for o in self._gather(outcome(err), self.ctl) if o is not None]
        if not failed and self.is_main:
            try:
                mf.commit(folder, self.world_size, meta)
            except BaseException as e:  # agreed on below
                err = e
            else:
                self._retain()
        if not failed:
            failed = [o for o in self._gather(outcome(err), self.ctl) if o is not None]
        if not failed:
            self.failed_saves = 0
            self.written.add(folder)
            if self.on_commit is not None:
                self.on_commit(folder, meta["step"], self.ctl)
            return folder
        self._failed(folder, failed, err, last_chance)
        return None

    def _failed(
        self, folder: str, failed: list, err: BaseException | None, last_chance: bool
    ) -> None:
        """A save that failed on some rank(s), the same verdict on every rank: stop at once
        (permanent), or count it and go on."""
        permanent, message = next(((p, m) for p, m in failed if p), failed[0])
        if permanent:
            if message.startswith("bug: "):  # a traceback, not a one-line error
                raise err if err is not None and outcome(err) else RuntimeError(message)
            raise UserError(message)
        self.failed_saves += 1
        if last_chance or self.failed_saves >= self.cfg.max_failed_saves:
            raise UserError(
                f"checkpoint {folder} could not be saved ({message}); "
                f"{self.failed_saves} failed save(s) in a row (checkpoint.max_failed_saves="
                f"{self.cfg.max_failed_saves}). Check the storage, then resume from the last "
                "committed checkpoint"
            )
        self.log.warn(
            f"checkpoint {folder} could not be saved ({message}); training goes on "
            f"and the next interval tries again ({self.failed_saves} of "
            f"checkpoint.max_failed_saves={self.cfg.max_failed_saves} in a row)"
        )

    def _retain(self) -> None:
        """Rank 0, after a commit. Best effort: what it cannot remove now, a later commit
        removes."""
        try:
            for old in mf.to_delete(
                mf.list_checkpoints(self.root), self.cfg.keep_last, self.cfg.keep_every
            ):
                storage.remove(old.path)
            for stale in mf.uncommitted(self.root):
                storage.remove(stale)  # interrupted saves (no save of ours is in flight now)
        except Exception as err:  # noqa: BLE001  (storage trouble: retention can wait)
            self.log.warn(f"retention under {self.root} postponed ({short(err)})")

    def close(self) -> None:
        self.wait()
        self.writes.shutdown()
        self.staging.close()
