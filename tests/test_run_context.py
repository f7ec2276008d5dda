"""What a command meets around it rather than in its arguments: torchrun's variables in the
environment, the devices this machine has, the directory it runs from. Each is one `error:`
line and exit 2 when it cannot work, never a traceback (issue 24, items 3, 4 and 6)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import train_args
from triaxis.checkpoint import manifest as mf
from triaxis.cli import main

TORCHRUN = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def one_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "this is a bug" not in lines[0] and captured.out == "", captured
    return lines[0]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
        (
            {**TORCHRUN, "WORLD_SIZE": "2", "MASTER_ADDR": ""},
            "WORLD_SIZE=2 is set but MASTER_ADDR is not",
        ),
        ({**TORCHRUN, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be a whole number >= 1"),
        ({**TORCHRUN, "WORLD_SIZE": "2", "RANK": "2"}, "RANK='2' must be a whole number 0..1"),
        ({**TORCHRUN, "WORLD_SIZE": "2", "MASTER_PORT": "x"}, "MASTER_PORT='x' must be"),
        ({"RANK": "1"}, "RANK='1' must be a whole number 0..0"),
    ],
    ids=["world-only", "no-addr", "world-text", "rank-range", "port-text", "rank-alone"],
)
def test_torchrun_variables_half_set(env, message, byte_data, tmp_path, monkeypatch, capsys):
    for var in ("WORLD_SIZE", *TORCHRUN):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert main(["train", *train_args(byte_data, tmp_path / "run", "--train.steps=1")]) == 2
    line = one_error(capsys)
    assert message in line and "triaxis launch" in line, line
    assert not (tmp_path / "run").exists()


def test_a_device_this_machine_lacks(monkeypatch, tmp_path, capsys):
    """--device cuda on a machine without CUDA (a CPU-only torch asserted deep inside .to()),
    and an index past the machine's GPUs: one line, before the checkpoint is read."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    missing = str(tmp_path / "nowhere")  # never reached: the device is checked first
    assert main(["generate", "--checkpoint", missing, "--device", "cuda"]) == 2
    assert "--device cuda but this machine has no CUDA device" in one_error(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["generate", "--checkpoint", missing, "--device", "cuda:1"]) == 2
    assert "has 1 CUDA device(s), cuda:0..cuda:0" in one_error(capsys)


def _checkpoint_of_a_run(ws_ckpt, project, data_path: str):
    """A copy of a checkpoint placed as an older run left it: PROJECT/runs/x/checkpoints/step_N,
    recording `data_path` as the run was given it and the config's relative run folder."""
    ckpt = project / "runs" / "x" / "checkpoints" / "step_00000000"
    shutil.copytree(ws_ckpt, ckpt)
    meta = json.loads((ckpt / mf.META).read_text())
    meta.update(data_path=data_path, config='[train]\nrun_dir = "runs/x"\n')
    (ckpt / mf.META).write_text(json.dumps(meta))
    return ckpt.parent.parent


@pytest.fixture
def small_checkpoint(tmp_path):
    from tests.bad_input_workspace import build_checkpoint

    return build_checkpoint(tmp_path / "ckpt")


def test_generate_finds_a_relative_data_path_from_elsewhere(
    small_checkpoint, byte_data, tmp_path, monkeypatch, capsys
):
    """A run that recorded `data/stdlib` (relative, as older runs did) generates from any
    directory: the checkpoint's place and its recorded folder locate the training directory.
    Where the data is gone, one line names --data; --data PATH then works."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(byte_data, project / "data" / "stdlib")
    run = _checkpoint_of_a_run(small_checkpoint, project, "data/stdlib")
    monkeypatch.chdir(elsewhere)
    argv = ["generate", "--checkpoint", str(run), "--prompt", "def", "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("def")
    shutil.move(project / "data", tmp_path / "moved")
    assert main(argv) == 2
    line = one_error(capsys)
    assert "records its data folder as 'data/stdlib', relative to the directory" in line
    assert f"nor {project}" in line and "pass --data PATH" in line
    assert "written before checkpoints carried their tokenizer" in line  # why it needs --data
    assert main([*argv, "--data", str(tmp_path / "moved" / "stdlib")]) == 0
    assert capsys.readouterr().out.startswith("def")


@pytest.mark.slow
def test_a_new_run_records_its_data_folder_absolute(byte_data, tmp_path, monkeypatch, capsys):
    """Trained from its directory with relative paths, generated from another one."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(byte_data, project / "data")
    monkeypatch.chdir(project)
    assert main(["train", *train_args("data", "runs/x", "--train.steps=2")]) == 0
    meta = mf.read_meta(mf.list_checkpoints(str(project / "runs/x/checkpoints"))[-1].path)
    assert meta["data_path"] == str(project / "data")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(project / "runs/x"), "--max-new-tokens", "3"]
    assert main(argv) == 0
