"""Checkpoints from elsewhere are data, never code; manifests never send a reader outside
the folder; a checkpoint that fails its checksums is refused on every load path; invalid
checkpoints are never started over, and a fresh start never replaces someone's checkpoints."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import slow_but_first
from tests.test_checkpoint import ENV, train_args, triaxis
from triaxis.checkpoint import checksum
from triaxis.checkpoint import manifest as mf


@pytest.fixture(scope="module")
def trained(byte_data, tmp_path_factory) -> Path:
    """A run with committed checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("trained") / "run"
    triaxis(
        "train",
        *train_args(
            byte_data, run, "--train.steps=2", "--checkpoint.interval=1", "--checkpoint.keep_last=0"
        ),
    )
    return run


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _set_entry(ckpt: Path, name: str) -> None:
    """Rewrite the manifest's entry for `name` as its writer would: whoever crafts a folder
    also writes consistent checksums, so only the reader's own rules can protect."""
    meta = json.loads((ckpt / mf.META).read_text())
    raw = (ckpt / name).read_bytes()
    digest = checksum.digest(checksum.of_manifest(meta), raw)
    meta["files"][name] = {"size": len(raw), "items": [[0, len(raw), digest]]}
    (ckpt / mf.META).write_text(json.dumps(meta))


def craft_metadata(ckpt: Path, marker: Path) -> None:
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _set_entry(ckpt, ".metadata")


def one_error_line(proc, *words) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    return helpers.one_error_line(proc.stderr, *words)


def load_paths(byte_data, run: Path, ckpt: Path, tmp_path: Path) -> dict:
    """Every command that opens a checkpoint, each as a user would run it."""
    return {
        "resume": lambda: triaxis(
            "train", *train_args(byte_data, run, "--train.steps=3"), check=False
        ),
        "initial": lambda: triaxis(
            "train",
            *train_args(
                byte_data, tmp_path / "fresh", "--train.steps=1", f"--checkpoint.initial={ckpt}"
            ),
            check=False,
        ),
        "generate": lambda: triaxis(
            "generate", "--checkpoint", ckpt, "--max-new-tokens", 2, check=False
        ),
        "export-hf": lambda: triaxis("export-hf", ckpt, tmp_path / "hf", check=False),
    }


@pytest.mark.parametrize(
    "path", slow_but_first("resume", "initial", "generate", "export-hf", "verify", "list")
)
def test_crafted_metadata_pickle_runs_nothing(path, trained, byte_data, tmp_path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    for found in mf.list_checkpoints(str(run / "checkpoints")):
        craft_metadata(Path(found.path), marker)
    ckpt = run / "checkpoints" / "step_00000002"
    if path == "verify":
        proc = triaxis("ckpt", "verify", ckpt.parent, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert ".metadata is not DCP metadata" in proc.stdout, proc.stdout
    elif path == "list":
        proc = triaxis("ckpt", "list", ckpt.parent)  # reads manifests only
        assert "       2" in proc.stdout
    else:
        proc = load_paths(byte_data, run, ckpt, tmp_path)[path]()
        one_error_line(proc, ".metadata is not DCP metadata", "posix.system", "nothing was run")
    assert not marker.exists(), f"{path} ran code from the checkpoint"


@pytest.mark.slow  # a fast lane under 3 min: its layer keeps a fast test
def test_crafted_value_pickle_runs_nothing(trained, byte_data, tmp_path):
    """DCP's own planner loads non-tensor values (step, cursor) with weights_only=False: a
    crafted value must be refused too."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from triaxis.checkpoint import dcp_io

    run = copy_run(trained, tmp_path)
    src = run / "checkpoints" / "step_00000002"
    dcp_to_torch_save(str(src), str(tmp_path / "full.pt"))
    state = torch.load(tmp_path / "full.pt", weights_only=False)
    marker = tmp_path / "pwned"
    state["train"]["step"] = _Evil(marker)
    meta = mf.read_meta(str(src))
    shutil.rmtree(run / "checkpoints")
    dst = str(mf.step_dir(str(run / "checkpoints"), 2))
    writer = dcp_io.writer(dst)
    dcp.save(state, storage_writer=writer)
    mf.write_sidecar(dst, 0, writer.digests)
    mf.commit(dst, 1, meta)
    assert mf.verify(dst) == []  # its checksums are consistent: only the loader can refuse
    proc = triaxis("train", *train_args(byte_data, run, "--train.steps=3"), check=False)
    one_error_line(proc, "'train.step' is not plain data", "nothing was run")
    assert not marker.exists()


@pytest.mark.parametrize("bad", slow_but_first("outside", "fifo", "symlink"))
def test_manifest_names_outside_the_folder_make_it_invalid(bad, trained, byte_data, tmp_path):
    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    for found in mf.list_checkpoints(str(root)):
        ckpt = Path(found.path)
        meta = json.loads((ckpt / mf.META).read_text())
        if bad == "outside":  # a real file, listed with its true size and sha256
            secret = tmp_path / "secret"
            secret.write_bytes(b"not yours")
            import hashlib

            rel = os.path.relpath(secret, ckpt)
            assert rel.startswith("../")
            meta["files"][rel] = {"size": 9, "sha256": hashlib.sha256(b"not yours").hexdigest()}
        else:  # a special file under a name DCP could have written
            name = "__0_7.distcp"
            if bad == "fifo":
                os.mkfifo(ckpt / name)
            else:
                (ckpt / name).symlink_to("/dev/zero")
            meta["files"][name] = {"size": 0, "items": []}
        (ckpt / mf.META).write_text(json.dumps(meta))
    verify = triaxis("ckpt", "verify", root, check=False)  # a FIFO read would block: timeout
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    want = "not a plain name" if bad == "outside" else "is not a regular file"
    assert verify.stdout.count(want) == 2, verify.stdout
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if not p.is_fifo()}
    proc = triaxis("train", *train_args(byte_data, run, "--train.steps=3"), check=False)
    one_error_line(proc, "every checkpoint under", want, "step_00000001", "step_00000002")
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if not p.is_fifo()}


def _flip(ckpt: Path) -> Path:
    shard = next(ckpt.glob("__0_*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    shard.write_bytes(bytes(raw))
    return shard


@pytest.mark.parametrize("path", slow_but_first("generate", "export-hf", "initial"))
def test_a_shard_failing_its_checksum_is_refused(path, trained, byte_data, tmp_path):
    """Weights-only loads verify what they read, in the one read that loads it."""
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step_00000002"
    _flip(ckpt)
    proc = load_paths(byte_data, run, ckpt, tmp_path)[path]()
    one_error_line(proc, "step_00000002", "__0_0.distcp fails its checksum")
    assert not (tmp_path / "hf" / "config.json").exists()


@pytest.mark.slow  # a fast lane under 3 min: its layer keeps a fast test
def test_every_checkpoint_invalid_stops_and_changes_nothing(trained, byte_data, tmp_path):
    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    for found in mf.list_checkpoints(str(root)):
        _flip(Path(found.path))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    proc = triaxis(
        "train",
        *train_args(byte_data, run, "--train.steps=4", "--checkpoint.interval=1"),
        check=False,
    )
    one_error_line(
        proc,
        "every checkpoint under",
        "step_00000001",
        "step_00000002",
        "fails its checksum",
        "--checkpoint.resume=none",
        "another --checkpoint.dir",
    )
    assert "step 1 " not in proc.stdout and not (run / "metrics.jsonl").read_text().count(
        '"step": 3'
    )
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_resume_none_refuses_a_folder_with_checkpoints(trained, byte_data, tmp_path):
    """A fresh start never deletes or replaces committed checkpoints it did not write."""
    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    proc = triaxis(
        "train",
        *train_args(
            byte_data,
            run,
            "--train.steps=2",
            "--checkpoint.interval=1",
            "--checkpoint.keep_last=1",
            "--checkpoint.resume=none",
        ),
        check=False,
    )
    one_error_line(
        proc, "checkpoint.resume=none", str(root), "2 committed checkpoint(s)", "--checkpoint.dir"
    )
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    # ... and into another folder it trains from scratch
    other = tmp_path / "other"
    triaxis(
        "train",
        *train_args(
            byte_data,
            run,
            "--train.steps=1",
            "--checkpoint.resume=none",
            f"--checkpoint.dir={other}",
        ),
        env=ENV,
    )
    assert [f.step for f in mf.list_checkpoints(str(other))] == [1]


@pytest.mark.parametrize("numel", [1000, 6_000_000])  # 6M fp32: read and hashed in chunks
def test_items_are_verified_in_the_read_that_loads_them(numel, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from triaxis.checkpoint import dcp_io
    from triaxis.errors import UserError

    path = str(tmp_path / "c")
    state = {"w": torch.randn(numel), "b": torch.randn(7), "step": 3}
    writer = dcp_io.writer(path)
    dcp.save(state, storage_writer=writer)
    files = writer.digests
    assert set(files) == {".metadata", "__0_0.distcp"}
    items = files["__0_0.distcp"]["items"]
    assert (
        len(items) == 3
        and sum(length for _, length, _ in items)
        == files["__0_0.distcp"]["size"]
        == (tmp_path / "c" / "__0_0.distcp").stat().st_size
    )
    out = {"w": torch.zeros(numel), "b": torch.zeros(7), "step": 0}
    dcp_io.load(out, path, files)
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3
    shard = tmp_path / "c" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    big = max(items, key=lambda it: it[1])
    raw[big[0] + big[1] * 3 // 4] ^= 0x10  # inside the largest tensor's bytes
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"__0_0.distcp fails its checksum"):
        dcp_io.load({"w": torch.zeros(numel), "b": torch.zeros(7), "step": 0}, path, files)
    dcp_io.load({"b": torch.zeros(7)}, path, files)  # a partial load reads only good items
