"""The bad-input matrix: for every command, hostile values and broken files give exit status 2,
exactly one `error:` line and no traceback, and leave every file byte-identical.

Each case is one row of CASES: (id, argv with {placeholders} into the workspace, a piece of
the expected error line). The CLI runs in-process (triaxis.cli.main), so the whole table costs
seconds. The workspace (prepared data, a checkpoint, an HF folder, broken copies of each) is
built once; before and after every case it is snapshot as {path: sha256}.
Checkpoint corruption (damaged or crafted checkpoint files) is covered by the checkpoint tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.bad_input_cases import PREPARE_TRAIN_CASES, TINY
from tests.bad_input_commands import COMMAND_CASES
from tests.bad_input_workspace import build, snapshot
from tests.helpers import command
from triaxis.cli import main

# The rows: (id, argv with {ws} placeholders, a piece of the expected error line).
CASES = PREPARE_TRAIN_CASES + COMMAND_CASES


@pytest.fixture(scope="module")
def ws(tmp_path_factory, byte_data) -> Path:
    """The workspace every case runs against (built once, never changed by a case)."""
    return build(tmp_path_factory.mktemp("ws"), byte_data)


def run_cli(argv: list[str], capsys, out: list[str] | None = None) -> tuple[int, str]:
    """(exit status, stderr); stdout is appended to `out` when given."""
    try:
        code = main(argv)
    except SystemExit as e:  # only --help / --version may exit; bad input must return
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    if out is not None:
        out.append(captured.out)
    return code, captured.err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, ws, capsys, monkeypatch):
    name, command, expect = case
    monkeypatch.chdir(ws)  # relative defaults (data/stdlib, runs/default) land in the snapshot
    monkeypatch.setenv("TRIAXIS_CACHE_DIR", str(ws.parent / f"{ws.name}-cache"))
    argv = [w.replace("{ws}", str(ws)) for w in command.split(" ")] if command else []
    before = snapshot(ws)
    out: list[str] = []
    code, err = run_cli(argv, capsys, out)
    after = snapshot(ws)
    lines = err.strip().splitlines()
    errors = [x for x in lines if "error:" in x]
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert "this is a bug" not in err, err
    assert expect.replace("{ws}", str(ws)) in errors[0], errors[0]
    if not command.startswith("prepare"):  # prepare logs its progress (tokenizer) as it works
        assert out == [""], out  # no table or partial output before the error
    assert after == before, {
        k: (before.get(k), after.get(k))
        for k in set(before) | set(after)
        if before.get(k) != after.get(k)
    }


def test_unexpected_error_is_one_line_and_debug_shows_it(monkeypatch, capsys):
    """A bug (any exception that is not bad input) is one line saying so, exit 1; --debug and
    TRIAXIS_DEBUG=1 show the traceback."""
    import triaxis.cli as cli

    def broken(a):
        raise RuntimeError("kaboom\nsecond line")

    real = cli.build_parser

    def parser():
        p = real()
        p._subparsers._group_actions[0].choices["config"].set_defaults(fn=broken)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["config"]) == cli.BUG_EXIT
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: RuntimeError: kaboom second line (this is a bug in triaxis; rerun with --debug "
        "for the traceback)"
    ]
    with pytest.raises(RuntimeError, match="kaboom"):
        cli.main(["config", "--debug"])
    monkeypatch.setenv("TRIAXIS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaboom"):
        cli.main(["config"])


def test_background_thread_errors_are_one_line_too(monkeypatch, capsys):
    """A writer thread (TensorBoard's) that meets the same full disk as the main thread adds no
    traceback and no second line; a bug in a thread is one line saying so."""
    import errno
    import threading

    import triaxis.cli as cli

    def fails_in_a_thread(a):
        def write():
            raise OSError(errno.ENOSPC, "No space left on device", "/run/tb/events")

        t = threading.Thread(target=write)
        t.start()
        t.join()
        raise OSError(errno.ENOSPC, "No space left on device", "/run/tb/events")

    real = cli.build_parser

    def parser():
        p = real()
        p._subparsers._group_actions[0].choices["config"].set_defaults(fn=fails_in_a_thread)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: /run/tb/events: the disk is full; free space or write elsewhere"
    ]
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: ZeroDivisionError: division by zero (this is a bug in triaxis; rerun with "
        "--debug for the traceback)"
    ]


def test_full_disk_is_one_line(tmp_path, capsys, byte_data):
    """A full disk under prepare's output and under train.run_dir: one line, exit 2, and
    prepare leaves nothing behind."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        (disk / "keep.txt").write_text("kept")
        before = snapshot(disk)
        big = tmp_path / "big.txt"
        big.write_text("x = 1\n" * 100_000)
        code, err = run_cli(
            ["prepare", "--input", str(big), "--output", str(disk / "out"), "--tokenizer", "byte"],
            capsys,
        )
        assert code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("error: ") and "disk is full" in err
        assert f"--output {disk / 'out'}" in err and "nothing was changed" in err
        assert len([x for x in err.splitlines() if "error:" in x]) == 1
        assert snapshot(disk) == before
        (disk / "filler").write_bytes(b"\0" * (60 * 1024))  # leave ~nothing for run_dir
        # As a user runs it: a subprocess, TensorBoard on (its writer thread meets the full
        # disk too, and must not add a traceback).
        proc = subprocess.run(
            command(
                "train",
                f"--data.path={byte_data}",
                f"--train.run_dir={disk / 'run'}",
                *TINY,
                "--metrics.tensorboard=true",
            ),
            capture_output=True,
            text=True,
            timeout=600,
        )
        err = proc.stderr
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert len([x for x in err.splitlines() if "error:" in x]) == 1, err
        assert "disk is full" in err, err
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: no unreadable path")
def test_unreadable_input_is_one_line(tmp_path, capsys):
    f = tmp_path / "secret.txt"
    f.write_text("text")
    f.chmod(0)
    code, err = run_cli(["prepare", "--input", str(f), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "Traceback" not in err and "permission denied" in err


def test_s3_output_is_untouched_by_bad_input(ws, moto_s3, capsys):
    """On s3:// too: a preparation that fails late, an output holding files prepare did not
    write, or a missing bucket leave every object as it was (one line, exit 2)."""
    from triaxis.data.prepare import PrepareOptions, prepare

    bucket = moto_s3.new_bucket()
    out = f"s3://{bucket}/data"
    prepare(
        PrepareOptions(inputs=[str(ws / "good.txt")], output=out, tokenizer="byte"),
        log=lambda *_: None,
    )
    moto_s3.put(f"s3://{bucket}/other/train_00000.bin", b"someone else's")

    def bucket_state() -> dict[str, bytes]:
        return {k: moto_s3.get(f"s3://{bucket}/{k}") for k in moto_s3.keys(f"s3://{bucket}/")}

    before = bucket_state()
    for argv, expect in (
        (
            ["--input", str(ws / "good.txt"), "--input", str(ws / "bad.jsonl"), "--output", out],
            "not valid JSON",
        ),
        (
            ["--input", str(ws / "good.txt"), "--output", f"s3://{bucket}/other"],
            "holds train_00000.bin",
        ),
        (
            ["--input", str(ws / "good.txt"), "--output", f"s3://{bucket}-missing/x"],
            "does not exist",
        ),
    ):
        code, err = run_cli(["prepare", "--tokenizer", "byte", *argv], capsys)
        errors = [x for x in err.splitlines() if "error:" in x]
        assert code == 2 and len(errors) == 1 and expect in errors[0], err
        assert "Traceback" not in err
        assert bucket_state() == before


def test_force_replaces_only_the_model_files(ws, tmp_path, capsys):
    """--force that works: export-hf swaps the model files and keeps a user's own files;
    import-hf swaps the checkpoint and leaves a committed one behind."""
    export = tmp_path / "export"
    shutil.copytree(ws / "export", export)
    (export / "model-00001-of-00009.safetensors").write_bytes(b"stale shard of an old export")
    assert main(["export-hf", str(ws / "ckpt"), str(export), "--force"]) == 0
    names = sorted(p.name for p in export.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".export*"))  # the staging sibling is gone
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ws / "ckpt", ckpt)
    (ckpt / "notes.txt").write_text("mine")
    assert main(["import-hf", str(ws / "hf"), "--output", str(ckpt), "--force"]) == 0
    meta = json.loads((ckpt / "triaxis.json").read_text())
    assert meta["source"].startswith("hf:") and (ckpt / "notes.txt").read_text() == "mine"
    assert set(meta["files"]) <= {p.name for p in ckpt.iterdir()}
    assert not list(tmp_path.glob(".ckpt.import*"))
    capsys.readouterr()


def test_prepare_again_replaces_only_its_own_files(ws, tmp_path):
    """A successful prepare over an earlier one: the old manifest's files that the new one does
    not list go, everything else in the folder stays."""
    from triaxis.data.prepare import PrepareOptions, prepare

    out = tmp_path / "out"
    first = prepare(
        PrepareOptions(
            inputs=[str(ws / "big.txt")], output=str(out), tokenizer="byte", shard_tokens=200_000
        ),
        log=lambda *_: None,
    )
    assert len(first["splits"]["train"]["shards"]) > 2
    (out / "mine.bin").write_bytes(b"a user's file")
    (out / "notes.txt").write_text("keep")
    second = prepare(
        PrepareOptions(inputs=[str(ws / "good.txt")], output=str(out), tokenizer="byte"),
        log=lambda *_: None,
    )
    listed = {s["file"] for split in second["splits"].values() for s in split["shards"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        listed | {"manifest.json", "mine.bin", "notes.txt"}
    )
