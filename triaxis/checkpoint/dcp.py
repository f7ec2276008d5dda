"""Sharded checkpoints of the whole training state with torch.distributed.checkpoint (DCP).

State: model and AdamW state (keys = the single-device parameter names, so any layout loads any
checkpoint: DCP reshards on load), LR-schedule position, step, data cursor, RNG state.
Every rank writes its own shards, then checksums them into a sidecar; rank 0 commits the
checkpoint by writing the manifest last (see manifest.py). Async saves stage the state in host
memory (the only part that blocks training) and write in a background thread; the commit happens
on a later step, once every rank's sidecar has landed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from triaxis import storage
from triaxis.checkpoint import manifest as mf
from triaxis.errors import UserError
from triaxis.model.llama import ModelArgs

_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelArgs)
                   if f.default is not dataclasses.MISSING}

# One process without a process group is a supported case (generation, single-device runs).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")


def _writer_reader(path: str):
    """DCP storage for a folder or an s3:// prefix."""
    if not storage.is_remote(path):
        return dcp.FileSystemWriter(path), dcp.FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import (
        FsspecReader,
        FsspecWriter,
    )

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kw: dict = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    # 16 MiB parts: large shards go up as multipart uploads, each part retried on its own.
    return (FsspecWriter(path, default_block_size=16 * 2**20, **kw),
            FsspecReader(path, **kw))


def _disk_full(err: OSError, folder: str) -> UserError:
    return UserError(f"checkpoint {folder}: the disk is full ({err.strerror}); free space, lower "
                     "checkpoint.keep_last, or point checkpoint.dir elsewhere, then resume. The "
                     "previous checkpoint is untouched; this partial one is invisible and "
                     "removed by the next run")


@contextlib.contextmanager
def _full_disk_is_a_user_error(folder: str):
    """Turn a write that filled the disk, however DCP wrapped it, into one line."""
    try:
        yield
    except BaseException as err:
        full = _disk_full_in(err)
        if full is not None:
            raise _disk_full(full, folder) from None
        raise


def _disk_full_in(err: BaseException) -> OSError | None:
    """The ENOSPC inside `err`, if any: DCP reports each rank's failure wrapped in a
    CheckpointException (a BaseException), possibly chained."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        if isinstance(e, CheckpointException):
            todo.extend(exc for exc, _ in e.failures.values())
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: str, model, optimizer, scheduler, model_args, layout: dict,
                 ckpt_cfg, rank: int, world_size: int, meta: dict, log):
        self.root = root
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.model_args = dataclasses.asdict(model_args)
        self.layout, self.cfg = layout, ckpt_cfg
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.meta, self.log = meta, log
        self.pending: tuple[str, dict, Future] | None = None
        self.committed = False  # the pending save's manifest is written (rank 0)
        self.sidecars = ThreadPoolExecutor(max_workers=1)
        # Async saves gather metadata in a background thread: give them their own gloo group
        # so they never interleave with the training collectives of the main thread.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() and \
            ckpt_cfg.async_save else None
        self.blocking_s: list[float] = []

    # -- saving ------------------------------------------------------------------------------
    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step: int, cursor: int, block: bool = False,
             loop_state: dict | None = None) -> str:
        """Save the state after `step`; async unless `block` or async is off. `loop_state`
        (JSON-able: the training loop's own carried state) goes into the manifest."""
        self.wait()  # one save in flight at a time
        folder = mf.step_dir(self.root, step)
        t0 = time.perf_counter()
        if self.is_main:
            storage.remove(folder)  # leftovers of an interrupted save of this step
        _barrier()
        state = self._state()
        state["train"] = {"step": step, "cursor": cursor,
                          "scheduler": self.scheduler.state_dict()["last_epoch"],
                          "rng": torch.get_rng_state()}
        writer, _ = _writer_reader(folder)
        meta = {"step": step, "cursor": cursor, "model": self.model_args, "layout": self.layout,
                "world_size": self.world_size, **self.meta, "loop_state": loop_state or {}}
        if self.cfg.async_save and not block:
            fut = dcp.async_save(state, storage_writer=writer, process_group=self.group)
            fut = getattr(fut, "upload_completion", fut)
            side = self.sidecars.submit(self._after_write, fut, folder)
            self.pending = (folder, meta, side)
            self.blocking_s.append(time.perf_counter() - t0)
            return folder
        with _full_disk_is_a_user_error(folder):
            dcp.save(state, storage_writer=writer)
        mf.write_sidecar(folder, self.rank)
        _barrier()
        if self.is_main:
            mf.commit(folder, self.world_size, meta)
            self._retain()
        _barrier()
        self.blocking_s.append(time.perf_counter() - t0)
        return folder

    def _after_write(self, fut: Future, folder: str) -> None:
        with _full_disk_is_a_user_error(folder):
            fut.result()
        mf.write_sidecar(folder, self.rank)

    def poll(self) -> str | None:
        """Commit a finished async save (rank 0); cheap, never blocks. Returns what it committed."""
        if self.pending is None or self.committed:
            return None
        folder, meta, side = self.pending
        if not side.done():
            return None
        side.result()  # re-raise a failed write here, in the training loop
        if not self.is_main or not mf.ready_to_commit(folder, self.world_size):
            return None
        mf.commit(folder, self.world_size, meta)
        self._retain()
        self.committed = True
        return folder

    def wait(self) -> None:
        """Block until a pending async save is written and committed (everywhere). Every rank
        keeps `pending` until here, committed or not: a rank that dropped it early would skip
        these barriers while the others wait in them."""
        if self.pending is None:
            return
        self.pending[2].result()
        _barrier()  # every rank's sidecar has landed
        self.poll()
        assert self.committed or not self.is_main, "sidecars missing after the barrier"
        self.pending, self.committed = None, False
        _barrier()

    def _retain(self) -> None:
        for old in mf.to_delete(mf.list_checkpoints(self.root), self.cfg.keep_last,
                                self.cfg.keep_every):
            storage.remove(old.path)
        for stale in mf.uncommitted(self.root):
            if self.pending is None or stale != self.pending[0]:
                storage.remove(stale)

    def close(self) -> None:
        self.wait()
        self.sidecars.shutdown()

    # -- resuming ----------------------------------------------------------------------------
    def find_resume(self) -> mf.Found | None:
        """The latest complete and valid checkpoint; others are skipped with a warning. Ranks
        share the checksum work and agree on the verdict."""
        for found in reversed(mf.list_checkpoints(self.root)):
            files = sorted(mf.read_meta(found.path)["files"])
            mine = files[self.rank::self.world_size] if self.cfg.verify_on_resume else []
            problems = mf.verify(found.path, only=mine) if mine else []
            bad = torch.tensor([len(problems)], dtype=torch.int64)
            if dist.is_initialized():
                dist.all_reduce(bad)
            if int(bad) == 0:
                return found
            self.log.warn(f"skipping checkpoint {found.path}: "
                          f"{'; '.join(problems) or 'a file failed its check on another rank'}")
        return None

    def check_compatible(self, path: str) -> None:
        # A field newer than the checkpoint was at its default when the checkpoint was written.
        saved = {**_MODEL_DEFAULTS, **mf.read_meta(path)["model"]}
        diffs = [f"{k}={saved.get(k)} (checkpoint) vs {v} (this run)"
                 for k, v in self.model_args.items() if saved.get(k) != v and k != "max_seq_len"]
        if diffs:
            raise UserError(f"checkpoint {path} holds a different model shape: {'; '.join(diffs)}."
                            " Use the checkpoint's [model] settings, point --checkpoint.dir "
                            "elsewhere, or start fresh with --checkpoint.resume=none")

    def load(self, path: str) -> dict:
        """Load the whole training state in place; returns {"step", "cursor", "loop_state"}."""
        self.check_compatible(path)
        state = self._state()
        state["train"] = {"step": 0, "cursor": 0, "scheduler": 0,
                          "rng": torch.get_rng_state()}
        # Keep this rank's own param groups: DCP stores one copy of their parameter lists
        # (rank 0's), which names none of another pipeline stage's parameters. Their
        # hyperparameters come from the config, the lr from the schedule (set below).
        groups = state["optim"].pop("param_groups")
        _, reader = _writer_reader(path)
        dcp.load(state, storage_reader=reader)
        state["optim"]["param_groups"] = groups
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        sched = self.scheduler.state_dict()
        sched["last_epoch"] = int(state["train"]["scheduler"])
        sched["_step_count"] = sched["last_epoch"] + 1
        self.scheduler.load_state_dict(sched)
        # LambdaLR recomputes the lr lazily; set it for the restored step now.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        torch.set_rng_state(state["train"]["rng"])
        return {"step": int(state["train"]["step"]), "cursor": int(state["train"]["cursor"]),
                "loop_state": mf.read_meta(path).get("loop_state", {})}

    def load_initial(self, path: str) -> None:
        """Model weights only (fine-tuning from e.g. `triaxis import-hf`), into any layout."""
        if not storage.exists(storage.join(path, mf.META)):
            raise UserError(f"checkpoint.initial={path} is not a triaxis checkpoint (no "
                            f"{mf.META}); create one with `triaxis import-hf` or point at a "
                            "step_XXXXXXXX folder")
        self.check_compatible(path)
        load_model_weights(self.model, path)


def load_model_weights(model, path: str) -> None:
    """Model weights only (for generation / fine-tuning), into a model of any layout."""
    sd = get_model_state_dict(model)
    _, reader = _writer_reader(str(path))
    dcp.load({"model": sd}, storage_reader=reader)
    set_model_state_dict(model, sd, options=StateDictOptions(strict=True))


# Back-compatible names used by generation and tests.
def complete_checkpoints(folder) -> list:
    return [f.path for f in mf.list_checkpoints(str(folder))]


read_meta = mf.read_meta
META = mf.META
