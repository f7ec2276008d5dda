"""`triaxis plan --memory-keep K` sizes the memory tier for the chosen layout, from the plan's
own per-GPU state: (K + 1) steps of every GPU's parameters and AdamW state on the node, twice
when the nodes hold each other's replicas."""

import json

import pytest

from triaxis.cli import main


def _plan(capsys, *extra) -> dict:
    assert main(["plan", "--model", "1b", "--gpu", "h100", "--top", "1", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("gpus", [8, 16])
def test_memory_tier_footprint_follows_the_plan(capsys, gpus):
    got = _plan(capsys, "--gpus", str(gpus), "--memory-keep", "2")
    best = got["plans"][0]
    per_gpu = best["memory_gib"]["params"] + best["memory_gib"]["optim"]
    copies = 2 if gpus > 8 else 1
    want = per_gpu * 2**30 * 8 * 3 * copies
    assert got["memory_tier_host_bytes_per_node"] == pytest.approx(want, rel=1e-3)
    assert "memory_tier_host_bytes_per_node" not in _plan(capsys, "--gpus", str(gpus))


def test_memory_tier_line_in_the_report(capsys):
    assert (
        main(["plan", "--model", "1b", "--gpus", "16", "--gpu", "h100", "--memory-keep", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "Memory tier (checkpoint.memory_keep=1):" in out and "buddy replica" in out
