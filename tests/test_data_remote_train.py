"""Training from S3 (moto's S3 server on loopback) through the CLI: a run killed and resumed with
another data-parallel size consumes exactly the uninterrupted run's sample ids, with its data-wait
metrics; a corrupted shard stops training in one line. The reader itself: test_data_remote.py."""

import gc
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist import WAIT_S
from tests.helpers import command
from tests.test_data_remote import corrupt, one_error_line
from triaxis.cli import main
from triaxis.data.dataset import TRACE_ENV

GLOBAL_BATCH = 8


def cli(*args) -> list[str]:
    return command(*map(str, args))


def train_args(data, run_dir, cache_dir, *extra) -> list[str]:
    return [
        "--model.preset=tiny",
        f"--data.path={data}",
        "--data.seq_len=32",
        f"--data.cache_dir={cache_dir}",
        f"--train.run_dir={run_dir}",
        f"--train.global_batch={GLOBAL_BATCH}",
        "--train.micro_batch=4",
        "--train.steps=24",
        "--train.val_every=0",
        "--metrics.log_every=4",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
        *extra,
    ]


def consumed(trace: Path) -> list[int]:
    ids = []
    for line in trace.read_text().splitlines():
        split, start, count = line.split()
        assert split == "train"
        ids += range(int(start), int(start) + int(count))
    return ids


def env_with(trace: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", TRACE_ENV: str(trace)}


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun starts each rank in a session of its
    own, so a process-group kill would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_train_from_s3_killed_and_resumed_with_other_dp(moto_s3, tmp_path, capsys):
    bucket = moto_s3.new_bucket()
    data, cache = f"s3://{bucket}/stdlib", tmp_path / "cache"
    assert (
        main(
            [
                "prepare",
                "--output",
                data,
                "--max-bytes",
                "300000",
                "--vocab-size",
                "300",
                "--shard-tokens",
                "8000",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    manifest = json.loads(moto_s3.get(f"{data}/manifest.json"))
    assert len(manifest["splits"]["train"]["shards"]) > 4
    assert manifest["tokenizer"]["kind"] == "bpe"

    # 2 processes (dp_shard=2, a synchronous checkpoint every 4 steps); rank 0 hangs as step 9
    # starts, so the run cannot finish whatever the machine's speed, and the whole tree is
    # SIGKILLed once the step-8 checkpoint is committed...
    run = tmp_path / "run"
    killed = subprocess.Popen(
        cli(
            "launch",
            "--nproc-per-node",
            2,
            *train_args(
                data,
                run,
                cache,
                "--parallel.dp_shard=2",
                "--checkpoint.interval=4",
                "--checkpoint.async_save=false",
                "--checkpoint.save_final=false",
            ),
        ),
        env={**env_with(tmp_path / "a.trace"), "TRIAXIS_FAULT_HANG": "0:forward@9"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = run / "checkpoints" / "step_00000008" / "triaxis.json"  # committed
    deadline = time.monotonic() + WAIT_S
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_tree(killed.pid)  # the launcher, its elastic agent and both rank processes
    killed.wait()
    assert last.exists(), "the 2-process run wrote no step-8 checkpoint"
    steps = sorted(
        int(p.name[5:]) for p in (run / "checkpoints").iterdir() if (p / "triaxis.json").exists()
    )
    assert steps == [4, 8]
    resume_cursor, total = 8 * GLOBAL_BATCH, 24 * GLOBAL_BATCH

    # ...then resumed by 1 process (dp=1, gradient accumulation 2) from that checkpoint.
    out = finish(
        subprocess.Popen(
            cli(
                "train",
                *train_args(
                    data, run, cache, "--checkpoint.interval=0", "--checkpoint.save_final=false"
                ),
            ),
            env=env_with(tmp_path / "b.trace"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )

    # The uninterrupted run reads global sample ids 0 .. total-1 in order (the cursor logic
    # of test_data.py); what each run here really read comes from its trace.
    before, after = consumed(tmp_path / "a.trace"), consumed(tmp_path / "b.trace")
    # The 2-process run read every sample before its checkpoint's cursor exactly once...
    assert sorted(i for i in before if i < resume_cursor) == list(range(resume_cursor))
    # ...and the 1-process run went on exactly there: no sample repeated, none skipped.
    assert after == list(range(resume_cursor, total))
    # Every rank process removed its cache at exit; the killed ranks' folders were swept.
    assert list(cache.iterdir()) == []
    # Data-wait metrics in every record; the resumed run warned for exactly the log windows
    # whose wait exceeded 10% of the step time (its records come last: the last one wins).
    share = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["data_wait_s"] >= 0 and 0 <= rec["data_wait_share"] <= 1
            share[rec["step"]] = rec["data_wait_share"]
    warned = {int(m) for m in re.findall(r"step (\d+): the data loader stalls training", out)}
    assert warned == {s for s, v in share.items() if s > steps[-1] and v > 0.1}


def test_cli_train_stops_on_a_corrupted_shard(moto_s3, byte_data, tmp_path, monkeypatch, capsys):
    uri = f"s3://{moto_s3.new_bucket()}/flip"
    corrupt(moto_s3, uri, uri, byte_data, "flip")
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    code = main(
        [
            "train",
            *train_args(
                uri,
                tmp_path / "r",
                tmp_path / "c",
                "--train.steps=200",
                "--checkpoint.interval=0",
                "--checkpoint.save_final=false",
            ),
        ]
    )
    assert code == 2
    assert "train_00001.bin fails its sha256 check" in one_error_line(capsys)
    assert len(consumed(tmp_path / "trace")) < 200 * GLOBAL_BATCH  # it stopped at the shard
    gc.collect()  # the trainer's datasets, now unreachable, close their caches
    assert list((tmp_path / "c").iterdir()) == []
