"""Context parallelism inside every pipeline schedule: cp=2 x pp=2 (world 4) trains like one
process with document masks, for each schedule triaxis runs (the single-stage ones and the
multi-stage ones, two stages per rank). The ring runs inside each stage's blocks, so a schedule
only changes when, not how, the ring is entered; the zero-bubble ones split backward into its
input and weight halves, which the ring's autograd.Function must survive."""

from __future__ import annotations

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect
from tests.test_cp_parity import RTOL, _reference
from tests.test_document_mask import short_docs  # noqa: F401 (a fixture)
from triaxis.parallel.partition import MULTI, SINGLE, stages_per_rank

SCHEDULES = [(name, stages_per_rank(name, 2)) for name in (*SINGLE, *MULTI)]
ZERO_BUBBLE = {"zbv", "dualpipev", "interleaved-zb"}
"""cp puts FSDP on (states over dp_shard x cp), and these schedules under FSDP need
reshard_after_forward=false (config.composition_problem refuses the rest in one line)."""
MODEL = {"model__tie_embeddings": "false", "model__n_layers": 4}


@pytest.mark.slow
@pytest.mark.parametrize("schedule,v", SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_cp2_pp2_schedule_matches_one_process(schedule, v, short_docs, tmp_path, tmp_path_factory):  # noqa: F811
    overrides = {
        "parallel__cp": 2,
        "parallel__pp": 2,
        "parallel__dp_shard": 1,
        "parallel__pp_schedule": schedule,
        "parallel__pp_virtual_stages": v,
        "data__document_mask": "true",
        # 8 samples a step in micro-batches of 2: 4 micro-batches, what every schedule needs
        "train__micro_batch": 2,
        **MODEL,
    }
    if schedule in ZERO_BUBBLE:
        overrides["parallel__reshard_after_forward"] = "false"
    got = run_workers(train_collect, 4, short_docs, str(tmp_path), overrides)
    ref = _reference(short_docs, True, 8, tmp_path_factory, **MODEL)
    params = {k: val for g in got for k, val in g["params"].items()}
    assert_same_run({**got[0], "params": params}, ref, RTOL.get("cp2_pp2", 1e-5))
