"""The prepared GPU session (bench/gpu_session.sh) on CPU: its plumbing, not its figures.

The GPU run is one shot in a short window, so what decides whether it yields numbers is proven
here: a row per part as it ends, error rows that do not stop later parts, SIGKILL at the
deadline (no preemption checkpoint), the summary last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import WAIT_S

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_session import Shape, triaxis_row  # noqa: E402 - bench/ is not a package
from gpu_summary import summary_text  # noqa: E402

# In CI the peer baseline sits beside the repository; on the dev machine, in /work/shared.
PEERS = [ROOT.parent / "shared/bench", Path("/work/shared/bench")]


def dry_run(tmp_path: Path, **env: str) -> tuple[list[dict], list[str]]:
    out, scratch = tmp_path / "out", tmp_path / "runs"
    full_env = {**os.environ, "DEV": "cpu", "OUT": str(out), "TRIAXIS_GPU_SCRATCH": str(scratch),
                "PYTHON": sys.executable, **env}  # fmt: skip
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh"], cwd=ROOT, env=full_env, capture_output=True,
        text=True, timeout=WAIT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    return rows, proc.stdout.splitlines()


def assert_summary_last(stdout: list[str], rows: list[dict]) -> None:
    start = stdout.index("== summary (from rows.jsonl)")
    assert not any(x.startswith(("ROW ", "== ")) for x in stdout[start + 1 :])
    assert stdout[-1].startswith("parts ok:")
    for row in rows:  # error rows too
        assert any(x.startswith(f"| {row['part']} ") for x in stdout[start:])


def test_summary_pairs_each_triaxis_row_with_its_peer_and_lists_failures():
    rows = [
        {"part": "triaxis-compiled", "ok": False, "error": "exit 1"},
        {"part": "triaxis-compiled", "ok": True, "tokens_per_s": 90.0, "mfu": 0.4},  # a rerun
        {"part": "hf-compiled", "ok": True, "tokens_per_s": 100.0, "mfu": 0.44},
        {"part": "triaxis-eager", "ok": True, "tokens_per_s": 60.0},
        {"part": "hf-eager", "ok": False, "error": "killed (SIGKILL)\nmore", "tail": []},
        {"part": "triaxis-fsdp", "ok": True, "tokens_per_s": 81.0},
        {"part": "plan-check", "ok": True, "checks": ["planner ...: PASS"]},
    ]
    text = summary_text(rows)
    assert "triaxis/HF compiled: 0.900x tokens/s" in text
    assert "triaxis/HF eager: n/a" in text
    assert "both compiled: 0.900x tokens/s" in text  # FSDP against the plain compiled row
    assert "CHECK planner ...: PASS" in text
    hf_eager = next(x for x in text.splitlines() if x.startswith("| hf-eager "))
    assert "| NO  |" in hf_eager and hf_eager.endswith("| killed (SIGKILL)")  # its first line
    assert text.count("| triaxis-compiled ") == 1 and "parts ok: 5/6; failed: hf-eager" in text


def test_throughput_is_total_tokens_over_the_timed_steps(tmp_path):
    """Records every 2 steps after 2 warm-up steps: 4 timed steps of 4x64 tokens, in windows of
    2 s and 1 s -> 1024 tokens / 3 s (not the best window's 512/s)."""
    s = Shape.of("cpu")
    recs = [
        {"step": 1, "tokens_per_s": 1.0, "max_memory_gib": 9.0, "loss": 7.0, "mfu": None},
        {"step": 2, "tokens_per_s": 10.0, "max_memory_gib": 9.0, "loss": 6.0, "mfu": None},
        {"step": 4, "tokens_per_s": 256.0, "max_memory_gib": 2.0, "loss": 5.0, "mfu": None},
        {"step": 6, "tokens_per_s": 512.0, "max_memory_gib": 2.5, "loss": 4.0, "mfu": None},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    row = triaxis_row(tmp_path, s)
    assert row["tokens_per_s"] == pytest.approx(1024 / 3) and row["peak_mem_gib"] == 2.5
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:3]))
    with pytest.raises(ValueError, match="no record at step 2 and 6"):
        triaxis_row(tmp_path, s)


@pytest.mark.slow
def test_the_deadline_sigkills_a_part_and_no_preemption_checkpoint_is_left(tmp_path):
    """A slow smoke run (15 s per step) past a 40 s deadline: killed with its group by SIGKILL
    while training (SIGTERM would make triaxis save a preemption checkpoint first), an error
    row with its output's tail; the next part finds no time and leaves a row saying so."""
    rows, stdout = dry_run(
        tmp_path,
        TRIAXIS_GPU_PARTS="smoke,triaxis-eager",
        TRIAXIS_GPU_DEADLINE_S="40",
        TRIAXIS_FAULT_STEP_DELAY_S="15",
    )
    smoke, eager = rows
    run_dir = tmp_path / "runs/smoke"
    assert (run_dir / "config.toml").exists()
    # (With SIGTERM, checkpoints/step_00000002 appeared here: checked once.)
    assert not list(run_dir.glob("checkpoints/step_*")), "a preemption checkpoint was written"
    assert smoke["part"] == "smoke" and not smoke["ok"] and smoke["rc"] == -9
    assert smoke["error"] == "RuntimeError: killed (SIGKILL)"
    assert any(x.startswith("model tiny:") for x in smoke["tail"])  # it was training
    assert eager["part"] == "triaxis-eager" and not eager["ok"] and eager["rc"] is None
    assert "left of the session's deadline" in eager["tail"][0]
    assert_summary_last(stdout, rows)


@pytest.mark.slow
def test_cpu_dry_run_of_every_part(tmp_path):
    """Every part, in order, on CPU; triaxis-eager forced to fail; the peer baseline (CUDA-only:
    no device flag) and the CUDA host-sync test (skipped on CPU) fail honestly. Each leaves its
    row and the parts after it still run."""
    found = [p / "hf_llama_baseline.py" for p in PEERS if (p / "hf_llama_baseline.py").is_file()]
    peer = found[0] if found else None
    if peer is None:
        pytest.skip("the peer baseline (shared/bench/hf_llama_baseline.py) is not here")
    rows, stdout = dry_run(tmp_path, TRIAXIS_GPU_PEER=str(peer), TRIAXIS_GPU_FAIL="triaxis-eager")
    order = ["smoke", "triaxis-compiled", "hf-compiled", "triaxis-eager", "hf-eager",
             "plan-check", "flex-vs-dense", "cp-kernels", "triaxis-fsdp", "host-sync"]  # fmt: skip
    assert [r["part"] for r in rows] == order
    by = {r["part"]: r for r in rows}
    for name in ("smoke", "triaxis-compiled", "plan-check", "flex-vs-dense", "cp-kernels",
                 "triaxis-fsdp"):  # fmt: skip
        assert by[name]["ok"], by[name]
    for name in ("triaxis-compiled", "triaxis-fsdp"):
        assert by[name]["tokens_per_s"] > 0 and by[name]["peak_mem_gib"] > 0
    assert "injected failure: triaxis-eager" in "\n".join(by["triaxis-eager"]["tail"])
    for name in ("hf-compiled", "hf-eager"):
        assert not by[name]["ok"] and "CUDA" in "\n".join(by[name]["tail"])
    assert not by["host-sync"]["ok"] and "SKIPPED" in by["host-sync"]["error"]
    assert "PASS" in by["flex-vs-dense"]["checks"][0]
    assert all("PASS" in check for check in by["cp-kernels"]["checks"])
    # metrics.reset_peak_memory_after fired once in each speed run (on CPU it can only say so)
    assert sum("a CPU process's peak cannot be reset" in x for x in stdout) == 2
    assert_summary_last(stdout, rows)
    assert "triaxis FSDP(dp_shard=1)/plain, both compiled: " in "\n".join(stdout[-8:])


@pytest.mark.slow
def test_triaxis_train_runs_without_s3fs_boto3_or_torchao(tmp_path):
    """The GPU image has none of them and nothing installs there: the session's `triaxis train`
    (synthetic data, local run folder) must not import them."""
    blocked = ("s3fs", "boto3", "botocore", "aiobotocore", "torchao")
    argv = ["train", "--model.preset=tiny", "--data.path=synthetic", "--data.seq_len=32",
            f"--train.run_dir={tmp_path}", "--train.steps=2", "--train.global_batch=2",
            "--train.micro_batch=2", "--train.device=cpu", "--checkpoint.save_final=false",
            "--metrics.progress=false", "--train.val_every=0"]  # fmt: skip
    code = (
        f"import sys\nfor m in {blocked!r}: sys.modules[m] = None  # import m raises\n"
        f"from triaxis.cli import main\nsys.exit(main({argv!r}))"
    )
    env = {**os.environ, "TRIAXIS_DEBUG": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=WAIT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "metrics.jsonl").exists()
