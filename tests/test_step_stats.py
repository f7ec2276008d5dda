"""Per-record gradient norm (pre-clip), clipping, tokens seen and the step-time breakdown
(issue 27, item 2). That none of it reads the device between log steps is test_host_sync's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_workers
from tests.helpers import in_process_trainer


def _trainer(data: str, run_dir, **extra: str):
    return in_process_trainer(
        data, run_dir, **{"train.lr": "3e-3", "train.warmup_steps": "0", **extra}
    )


def _records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _first_step_norm(data: str, run_dir) -> float:
    """The reference: the norm of the first batch's gradients, taken by hand."""
    trainer = _trainer(data, run_dir)
    trainer.forward_backward(0, 1)
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def test_records_carry_the_pre_clip_grad_norm_and_the_step_times(byte_data, tmp_path):
    reference = _first_step_norm(byte_data, tmp_path / "ref")
    runs = {}
    for clip in ("1e-3", "1e6"):
        _trainer(byte_data, tmp_path / clip, **{"train.grad_clip": clip}).fit()
        runs[clip] = _records(tmp_path / clip)
    tight, loose = runs["1e-3"], runs["1e6"]
    assert [r["step"] for r in tight] == [1, 2, 4]
    # Pre-clip: clipping to 1e-3 does not change the logged norm of the first step.
    assert tight[0]["grad_norm"] == pytest.approx(reference, rel=1e-5)
    assert loose[0]["grad_norm"] == pytest.approx(reference, rel=1e-5)
    assert all(r["grad_clipped"] for r in tight)
    assert not any(r["grad_clipped"] for r in loose)
    for r in tight:
        assert r["tokens_seen"] == r["step"] * 8 * 32
        assert r["fwd_bwd_s"] > 0 and r["optimizer_s"] > 0 and r["data_wait_s"] >= 0
        # The phases are parts of the step, not more than it.
        per_step_s = 8 * 32 / r["tokens_per_s"]
        assert r["fwd_bwd_s"] + r["optimizer_s"] + r["data_wait_s"] <= per_step_s * 1.05


def _norms(rank: int, world: int, data: str, run_dir: str, extra: dict) -> dict:
    trainer = _trainer(data, run_dir, **extra)
    trainer.fit()
    if rank != 0:
        return {}
    return {r["step"]: r["grad_norm"] for r in _records(run_dir)}


@pytest.mark.slow
def test_fsdp_world_2_logs_the_single_process_grad_norm(byte_data, tmp_path):
    one = _norms(0, 1, byte_data, str(tmp_path / "one"), {})
    two = run_workers(
        _norms, 2, byte_data, str(tmp_path / "two"), {"parallel.dp_shard": "2"}, timeout_s=240
    )[0]
    assert sorted(two) == sorted(one) == [1, 2, 4]
    for step, norm in one.items():
        assert two[step] == pytest.approx(norm, rel=1e-4), step
