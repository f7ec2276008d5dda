"""OS errors on the user's own paths (issue 24): a read-only run or checkpoint folder, missing or
unreadable data end in the same one line and exit 2 whether `triaxis train` runs alone or as the
ranks of `triaxis launch` (the line once, not a traceback per rank); an OS error on a file the
user did not name stays a bug."""

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ENV, command, slow_but_first, train_args
from triaxis.errors import os_error_line

CASES = ["read-only run_dir", "read-only checkpoint dir", "missing data", "unreadable data"]
MODES = ["one process", pytest.param("launch world 2", marks=pytest.mark.slow)]
AS_ROOT = os.geteuid() == 0
needs_ro = pytest.mark.skipif(
    AS_ROOT and not (shutil.which("unshare") and shutil.which("setpriv")),
    reason="root reads and writes anywhere: needs unshare -m and setpriv",
)


def setup(case: str, byte_data: str, tmp: Path) -> tuple[list[str], Path | None, str]:
    """(train flags, a folder to make read-only or None, the path the line must name)."""
    ro = tmp / "ro"
    ro.mkdir()
    run, data = tmp / "run", byte_data
    extra: list[str] = []
    if case == "read-only run_dir":
        run, named = ro / "run", str(ro / "run")
    elif case == "read-only checkpoint dir":
        # With the run's own HF folder asked for too: it lives in the checkpoint (issue 25).
        extra, named = [f"--checkpoint.dir={ro / 'ck'}", "--checkpoint.hf=final"], str(ro / "ck")
    elif case == "missing data":
        data = named = str(tmp / "no-data")
    else:  # a shard nobody may read
        data = str(tmp / "data")
        shutil.copytree(byte_data, data)
        shard = sorted(Path(data).glob("train_*.bin"))[0]
        shard.chmod(0)
        named = str(shard)
    flags = train_args(data, run, "--train.steps=2", *extra)
    return flags, (ro if case.startswith("read-only") else None), named


def run_with(argv: list[str], read_only: Path | None) -> subprocess.CompletedProcess:
    if read_only is not None and AS_ROOT:
        # Root ignores permissions: a read-only tmpfs in a private mount namespace.
        script = 'mount -t tmpfs -o ro tmpfs "$0" || exit 99; exec "$@"'
        argv = ["unshare", "-m", "sh", "-c", script, str(read_only), *argv]
    elif read_only is not None:
        read_only.chmod(0o555)
    elif AS_ROOT:  # root without the capabilities that override file permissions
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)


@needs_ro
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", slow_but_first(*CASES))
def test_user_os_error_is_one_line_alone_and_launched(case, mode, byte_data, tmp_path):
    flags, read_only, named = setup(case, byte_data, tmp_path)
    if mode == "one process":
        argv = command("train", *flags)
    else:
        argv = command("launch", "--nproc-per-node", "2", *flags)
    proc = run_with(argv, read_only)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "bug" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    # The launcher names the rank; the rest of the line is the one process's line.
    line = re.sub(r"^error: rank \d+: ", "error: ", errors[0])
    assert line.startswith(f"error: {named}") or named in line, (named, line)
    alone = run_with(command("train", *flags), read_only) if mode != "one process" else proc
    assert alone.returncode == 2
    assert [x for x in alone.stderr.splitlines() if x.startswith("error:")] == [line]


def test_only_the_users_paths_are_user_errors(tmp_path):
    """An OS error on a file the user did not name (torch's, inductor's cache) is not theirs."""
    run = str(tmp_path / "run")
    inside = PermissionError(errno.EACCES, "Permission denied", f"{run}/metrics.jsonl")
    above = PermissionError(errno.EROFS, "Read-only file system", str(tmp_path))
    cache = PermissionError(errno.EACCES, "Permission denied", "/tmp/torchinductor_u/x.py")
    nameless = PermissionError(errno.EACCES, "Permission denied")
    full = OSError(errno.ENOSPC, "No space left on device")
    assert os_error_line(inside, [run]) == f"{run}/metrics.jsonl: " + (
        "permission denied; fix the permissions or choose another path"
    )
    assert os_error_line(above, [run]).startswith(f"{tmp_path}: the file system is read-only")
    assert os_error_line(cache, [run, "data/stdlib"]) is None
    assert os_error_line(nameless, [run]) is None
    assert os_error_line(full, []) == "No space left on device: the disk is full; " + (
        "free space or write elsewhere"
    )
    assert os_error_line(OSError(errno.ENOENT, "x", "/"), [run]) is None  # "/" is above all


def test_an_os_error_in_torch_is_a_bug_not_a_path_error(monkeypatch, capsys):
    """The command line's mapping: before, any EACCES was "permission denied; fix the
    permissions" even for a file inside torch."""
    from triaxis import cli

    def torch_fails(a):
        raise PermissionError(errno.EACCES, "Permission denied", "/tmp/torchinductor_u/cache")

    real = cli.build_parser

    def parser():
        p = real()
        p._subparsers._group_actions[0].choices["config"].set_defaults(fn=torch_fails)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["config"]) == 1
    assert "this is a bug in triaxis" in capsys.readouterr().err
