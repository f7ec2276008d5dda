"""DCP readers and writers for a folder or an s3:// prefix: checksummed as they write, verified
and safe as they read (integrity.py, safe_load.py); and the one-line errors their failures
become."""

from __future__ import annotations

import contextlib
import errno
import logging
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from triaxis import storage, storage_client
from triaxis.checkpoint import checksum, integrity
from triaxis.checkpoint import manifest as mf
from triaxis.checkpoint.safe_load import SafeLoadPlanner, UnsafeMetadata, refuse
from triaxis.errors import UserError

# One process without a process group is a supported case (generation, single-device runs).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")


class _NoMetadataFallbackWarning(logging.Filter):
    """DCP logs a failed metadata read with its traceback on the root logger before it
    raises; the failure reaches the user once, as one line, from load() below."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Global metadata is not found")


logging.getLogger().addFilter(_NoMetadataFallbackWarning())


def writer(path: str):
    """A DCP writer that records each file's size and per-item checksums (checksum.WRITE)
    in `.digests`."""
    if not storage.is_remote(path):
        return integrity.hashing(dcp.FileSystemWriter(path))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    # 16 MiB parts: large shards go up as multipart uploads, each part retried on its own.
    return integrity.hashing(
        FsspecWriter(path, default_block_size=16 * 2**20, **storage_client.s3_options())
    )


def reader(path: str, expected: dict | None, algorithm: str = checksum.WRITE):
    """A DCP reader that refuses unsafe metadata and, given the manifest's file table (and
    the checksum it records), checks every item it reads against its write-time checksum."""
    remote = storage.is_remote(path)
    cls = integrity.reader_class(remote)
    r = cls(path, **storage_client.s3_options()) if remote else cls(path)
    r._setup_verify(expected, path, algorithm)
    return r


def load(
    state: dict,
    path: str,
    expected: dict | None,
    process_group=None,
    algorithm: str = checksum.WRITE,
    no_dist: bool = False,
) -> None:
    """dcp.load in place, safe, verified, with its failures as one line naming the file.
    `no_dist`: this rank alone (no collective), e.g. each rank reading different tensors."""
    r = reader(path, expected, algorithm)
    try:
        dcp.load(
            state,
            storage_reader=r,
            planner=SafeLoadPlanner(),
            process_group=process_group,
            no_dist=no_dist,
        )
    except BaseException as err:
        mapped = load_error(r.failure or err, path)
        if mapped is err:
            raise
        raise mapped from None


def load_error(err: BaseException, path: str) -> BaseException:
    unsafe = integrity.find_in(err, UnsafeMetadata)
    if unsafe is not None:
        return refuse(unsafe, path)
    bad = integrity.find_in(err, integrity.ChecksumMismatch)
    if bad is not None:
        return UserError(
            f"checkpoint {path}: {bad}; refusing to load it. Restore the file, or "
            "use another checkpoint (`triaxis ckpt verify` checks them all)"
        )
    return err


def checked(path: str) -> dict:
    """The manifest of one checkpoint named by the user, or one line saying why it cannot be
    used. Legacy manifests (whole-file sha256, e.g. from import-hf) are verified here, as
    their items cannot be checked while loading."""
    meta, problems = mf.check(path)
    if problems:
        raise UserError(
            f"checkpoint {path} is invalid: {'; '.join(problems)}. Use another "
            "checkpoint, or repair this one"
        )
    if mf.is_legacy(meta):
        problems = mf.verify(path)
        if problems:
            raise UserError(f"checkpoint {path}: {'; '.join(problems)}; refusing to load it")
    return meta


def expected_files(meta: dict) -> dict | None:
    """What a verifying reader checks against (None: legacy, verified beforehand)."""
    return None if mf.is_legacy(meta) else meta["files"]


def load_model_weights(
    model, path: str, meta: dict | None = None, skip=None, no_dist: bool = False
) -> None:
    """Model weights only (generation, export, fine-tuning), into a model of any layout;
    verified and safe. `meta`: what `checked(path)` returned, if the caller has it. `skip`:
    a predicate on names the checkpoint need not hold (LoRA adapters over a base model)."""
    meta = meta or checked(str(path))
    sd = get_model_state_dict(model)
    if skip is not None:
        sd = {k: v for k, v in sd.items() if not skip(k)}
    algorithm = checksum.of_manifest(meta)
    load({"model": sd}, str(path), expected_files(meta), algorithm=algorithm, no_dist=no_dist)
    set_model_state_dict(model, sd, options=StateDictOptions(strict=skip is None))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def loaded_in_place(state: dict, model, optimizer) -> bool:
    """Whether every value of the loaded model and optimizer state is a tensor whose memory is
    a live parameter, buffer or optimizer state of `model` / `optimizer` (so the load already
    restored them). A value DCP had to replace (a Python number, a tensor of its own) is not."""
    live = {_local(t).data_ptr() for t in (*model.parameters(), *model.buffers())}
    for per_param in optimizer.state.values():
        live.update(_local(v).data_ptr() for v in per_param.values() if torch.is_tensor(v))

    def leaves(tree):
        if isinstance(tree, dict):
            for v in tree.values():
                yield from leaves(v)
        else:
            yield tree

    for leaf in (*leaves(state["model"]), *leaves(state["optim"]["state"])):
        if not torch.is_tensor(leaf):
            return False
        if leaf.numel() and _local(leaf).data_ptr() not in live:
            return False
    return True


def disk_full(err: OSError, folder: str) -> UserError:
    return UserError(
        f"checkpoint {folder}: the disk is full ({err.strerror}); free space, lower "
        "checkpoint.keep_last, or point checkpoint.dir elsewhere, then resume. The "
        "previous checkpoint is untouched; this partial one is invisible and "
        "removed by the next run"
    )


def disk_full_in(err: BaseException) -> OSError | None:
    return next(
        (e for e in integrity.walk(err) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None
    )


@contextlib.contextmanager
def full_disk_is_a_user_error(folder: str):
    """Turn a write that filled the disk, however DCP wrapped it, into one line."""
    try:
        yield
    except BaseException as err:
        full = disk_full_in(err)
        if full is not None:
            raise disk_full(full, folder) from None
        raise


def restore_schedule(scheduler, optimizer, last_epoch: int) -> None:
    """Put the LR schedule at a restored step (the durable and the memory tier alike)."""
    sched = scheduler.state_dict()
    sched["last_epoch"] = last_epoch
    sched["_step_count"] = last_epoch + 1
    scheduler.load_state_dict(sched)
    # LambdaLR recomputes the lr lazily; set it for the restored step now.
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
