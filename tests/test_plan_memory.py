"""The memory model's state part against real triaxis layouts on CPU.

One subprocess joins a fake process group as the last rank of 6 (the rank whose FSDP shards are
shortest when dims do not divide by 3), builds a real layout with triaxis.parallel.parallelize,
runs a step and sums its local parameter, gradient and AdamW tensors. The prediction must match
within 5% (it is exact by construction, so any drift in the runtime's sharding shows up here).
The full matrix, ranks 0 and last, is bench/plan_memory.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from triaxis.plan.evidence import MeasuredLayout
from triaxis.plan.memory import predict_state_bytes_per_rank

# TP x FSDP with padding (64 rows over 3 shards) and a tied head; the bench adds MiCS replicas,
# plain FSDP, TP alone and rank 0 (~2 s a layout here, so the unit test keeps one).
LAYOUTS = [MeasuredLayout("tiny", 1, 3, 2, tied=True)]
RANK = 5


@pytest.mark.slow
def test_predicted_state_bytes_match_measured():
    specs = [
        f"{m.preset}:{m.dp_replicate}:{m.dp_shard}:{m.tp}"
        + ("" if m.tied is None else (":tied" if m.tied else ":untied"))
        for m in LAYOUTS
    ]
    out = subprocess.run(
        [sys.executable, "-m", "triaxis.plan.evidence", "measure", str(RANK), *specs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    for m, got in zip(LAYOUTS, measured):
        pred = predict_state_bytes_per_rank(
            m.model_args(), m.dp_shard, m.dp_replicate, m.tp, 1, rank=RANK
        )
        for key in ("params", "grads", "optim"):
            assert abs(pred[key] / got[key] - 1) <= 0.05, (m, key, pred[key], got[key])
        # Rank 0's (padded) figure bounds every rank: what the planner budgets.
        rank0 = predict_state_bytes_per_rank(m.model_args(), m.dp_shard, m.dp_replicate, m.tp, 1)
        assert rank0["total"] >= pred["total"]
