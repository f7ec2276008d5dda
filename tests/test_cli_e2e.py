"""Drive the CLI as a user would: prepare -> train -> generate -> resume; bad input exits 2."""

import json
import signal

import pytest

from tests import helpers
from tests.helpers import losses, triaxis


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    triaxis("prepare", "--output", out, "--max-bytes", 400_000, "--vocab-size", 512)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "bpe" and manifest["tokenizer"]["vocab_size"] == 512
    assert manifest["splits"]["train"]["tokens"] > 30_000
    assert (out / "tokenizer.json").is_file()
    return out


def train_args(data, run_dir, *extra):
    return [
        "train",
        *helpers.train_args(
            data,
            run_dir,
            "--train.micro_batch=8",
            "--train.lr=3e-3",
            "--train.warmup_steps=5",
            "--train.val_every=15",
            "--metrics.tensorboard=true",
            *extra,
            seq_len=64,
        ),
    ]


def test_train_loss_falls_and_generate(bpe_data, tmp_path):
    run = tmp_path / "run"
    triaxis(*train_args(bpe_data, run, "--train.steps=30", "--checkpoint.interval=15"))
    loss = losses(run)
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, f"loss fell only from {first:.3f} to {last:.3f}"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "mfu"} <= set(records[0])
    assert any("val_loss" in r for r in records)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    resolved = (run / "config.toml").read_text()
    assert "steps = 30" in resolved and 'preset = "tiny"' in resolved
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000015",
        "step_00000030",
    ]
    out = triaxis("generate", "--checkpoint", run, "--prompt", "def ", "--max-new-tokens", 20)
    assert out.stdout.startswith("def ") and len(out.stdout) > len("def ") + 5


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(bpe_data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ["--train.steps=16", "--checkpoint.interval=8", "--train.val_every=0"]
    triaxis(*train_args(bpe_data, ref, *common))
    # The second run SIGKILLs itself as step 12 starts: its step-8 checkpoint (written
    # synchronously, so committed by then) is the one the third run resumes from.
    killed = triaxis(
        *train_args(bpe_data, run, *common, "--checkpoint.async_save=false"),
        env={"TRIAXIS_FAULT_KILL": "0:12"},
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "checkpoints" / "step_00000008" / "triaxis.json").exists()
    assert max(losses(run)) == 11
    triaxis(*train_args(bpe_data, run, *common))
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), step


def error_of(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(bpe_data, tmp_path):
    assert "run `triaxis prepare" in error_of(
        triaxis(*train_args(tmp_path / "nodata", tmp_path / "r"), check=False)
    )
    assert "did you mean train.steps" in error_of(
        triaxis(*train_args(bpe_data, tmp_path / "r", "--train.stpes=3"), check=False)
    )
    assert "must be int" in error_of(
        triaxis(*train_args(bpe_data, tmp_path / "r", "--train.steps=ten"), check=False)
    )
    assert "max_seq_len=256" in error_of(
        triaxis(*train_args(bpe_data, tmp_path / "r", "--data.seq_len=1000"), check=False)
    )
    assert "matches no file" in error_of(
        triaxis(
            "prepare", "--input", tmp_path / "none*.txt", "--output", tmp_path / "p", check=False
        )
    )
    assert not (tmp_path / "r").exists()  # nothing written by a refused run


@pytest.mark.slow
def test_checkpoint_of_another_shape_is_refused_untouched(bpe_data, tmp_path):
    run = tmp_path / "run"
    triaxis(*train_args(bpe_data, run, "--train.steps=2", "--train.val_every=0"))
    ckpt = run / "checkpoints" / "step_00000002"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    config_before = (run / "config.toml").read_text()
    msg = error_of(
        triaxis(*train_args(bpe_data, run, "--train.steps=4", "--model.dim=128"), check=False)
    )
    assert "different model shape" in msg and "dim=64 (checkpoint) vs 128" in msg
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    assert (run / "config.toml").read_text() == config_before


@pytest.mark.slow
def test_launch_two_processes_sharded(bpe_data, tmp_path):
    run = tmp_path / "run"
    proc = triaxis(
        "launch",
        "--nproc-per-node",
        2,
        *train_args(
            bpe_data,
            run,
            "--train.steps=4",
            "--parallel.dp_shard=2",
            "--train.micro_batch=4",
            "--train.val_every=4",
        )[1:],
        timeout=180,
    )
    assert proc.stdout.count("step      4/4") == 1  # progress from rank 0 only
    assert "validation loss" in proc.stdout
    assert sorted(losses(run)) == [1, 2, 3, 4]
    meta = json.loads((run / "checkpoints" / "step_00000004" / "triaxis.json").read_text())
    assert meta["layout"]["dp_shard"] == 2 and meta["layout"]["world_size"] == 2


@pytest.mark.slow
def test_launch_refuses_impossible_layouts(bpe_data, tmp_path):
    msg = error_of(
        triaxis(
            "launch",
            "--nproc-per-node",
            2,
            *train_args(bpe_data, tmp_path / "r", "--parallel.tp=2", "--parallel.dp_shard=2")[1:],
            check=False,
        )
    )
    assert "= 4 but the world size is 2" in msg
    msg = error_of(
        triaxis(
            "launch",
            "--nproc-per-node",
            2,
            *train_args(bpe_data, tmp_path / "r", "--parallel.tp=2", "--model.n_kv_heads=1")[1:],
            check=False,
        )
    )
    assert "choose tp in [1]" in msg


def test_layout_command(tmp_path):
    out = triaxis("layout", "--world", 8, "--dp-replicate", 2, "--tp", 2).stdout
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rows[3] == ["0", "3", "3", "0", "0", "1", "0", "1"]  # node 0, gpu 3: shard 1, tp 1
    assert "dp_shard=2" in out
    # cp sits between tp and the partition group; --layers names each rank's sequence chunks.
    svg = tmp_path / "l.svg"
    out = triaxis("layout", "--world", 8, "--cp", 2, "--tp", 2, "--layers", 4, "--svg", svg).stdout
    assert "dp_shard=2 x cp=2 x tp=2" in out
    assert svg.read_text().count("cp chunks 0,3/4") == 4  # ranks 0, 1, 4, 5
    assert "rank    2  stage 0:  layers 0-3, tp shard 1/2, sequence chunks 1,2/4" in out
