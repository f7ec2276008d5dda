"""Async saves stage the state into host buffers allocated once and refilled at every save
(triaxis.checkpoint.staging): the same memory save after save, the current values each time,
never an alias of the live tensors training keeps changing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from triaxis.checkpoint.staging import ReusedStaging
from triaxis.parallel.compat import REUSABLE_STAGER


@pytest.mark.skipif(not REUSABLE_STAGER, reason="torch < 2.13 stages with the writer's own copy")
def test_saves_reuse_the_host_buffers_and_copy_the_current_state(tmp_path):
    state = {
        "model": {"w": torch.randn(64, 32), "b": torch.randn(32)},
        "train": {"step": 1, "rng": torch.get_rng_state()},
    }
    staging = ReusedStaging()
    first = staging.stage(state, dcp.FileSystemWriter(str(tmp_path / "1")))
    ptrs = {k: t.data_ptr() for k, t in first["model"].items()}
    state["model"]["w"].add_(1.0)  # training goes on
    state["train"]["step"] = 2
    assert not torch.equal(first["model"]["w"], state["model"]["w"])  # a copy, not an alias
    second = staging.stage(state, dcp.FileSystemWriter(str(tmp_path / "2")))
    assert {k: t.data_ptr() for k, t in second["model"].items()} == ptrs  # no new allocation
    for k, t in state["model"].items():
        assert torch.equal(second["model"][k], t) and second["model"][k].data_ptr() != t.data_ptr()
    assert second["train"]["step"] == 2
    assert not second["model"]["w"].is_pinned()  # pinned only where a GPU holds the state
    staging.close()
