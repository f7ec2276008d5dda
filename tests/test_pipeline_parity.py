"""Pipeline parallelism: every schedule, and the 3-D layout, train like one process."""

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect
from triaxis.parallel.partition import MULTI, SINGLE, stages_per_rank

# 8 blocks: enough for pp 4 x 2 virtual stages, one block each.
UNTIED = {"model__tie_embeddings": "false", "model__n_layers": 8}
_refs: dict = {}


def reference(data, tmp_path_factory, micro_batch: int) -> dict:
    if micro_batch not in _refs:
        _refs[micro_batch] = train_collect(
            0,
            1,
            data,
            str(tmp_path_factory.mktemp("ref")),
            {**UNTIED, "train__micro_batch": micro_batch},
        )
    return _refs[micro_batch]


# (schedule, virtual stages per rank): every runtime schedule, at the fewest stages it runs;
# micro-batches per step = 8 / micro_batch.
SCHEDULES = [(name, stages_per_rank(name, 2)) for name in (*SINGLE, *MULTI)]


@pytest.mark.parametrize("pp", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("schedule,v", SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_schedule_matches_single_process(schedule, v, pp, byte_data, tmp_path, tmp_path_factory):
    micro = 1 if pp * v >= 4 else 2  # 8 or 4 micro-batches: what the deepest schedule needs
    got = run_workers(
        train_collect,
        pp,
        byte_data,
        str(tmp_path),
        {
            **UNTIED,
            "parallel__pp": pp,
            "parallel__dp_shard": 1,
            "parallel__pp_schedule": schedule,
            "parallel__pp_virtual_stages": v,
            "train__micro_batch": micro,
        },
    )
    # Each rank returns its own stages' parameters; together they are the whole model.
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:
        assert r["losses"] == got[0]["losses"]  # every rank logs the same loss
        merged["params"].update(r["params"])
    assert_same_run(merged, reference(byte_data, tmp_path_factory, micro))


@pytest.mark.slow
def test_3d_layout_world8_matches_single_process(byte_data, tmp_path, tmp_path_factory):
    """pp 2 x tp 2 x dp_shard 2 on one mesh of 8 ranks."""
    got = run_workers(
        train_collect,
        8,
        byte_data,
        str(tmp_path),
        {
            **UNTIED,
            "parallel__pp": 2,
            "parallel__tp": 2,
            "parallel__dp_shard": 2,
            "train__micro_batch": 2,
        },
    )
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:
        merged["params"].update(r["params"])
    assert_same_run(merged, reference(byte_data, tmp_path_factory, 4))
