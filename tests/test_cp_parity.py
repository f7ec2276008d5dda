"""Context parallelism trains the same model as one process: 5 steps, losses and parameters.

Each layout runs with plain causal attention (byte corpus) and with document masking (short
documents: several per window, crossing the cp shards' boundaries).
"""

from __future__ import annotations

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect
from tests.test_document_mask import short_docs  # noqa: F401 (a fixture)

_refs: dict = {}

LAYOUTS = {
    "cp2": (2, {"parallel__cp": 2, "parallel__dp_shard": 1}),
    "cp2_shard2": (4, {"parallel__cp": 2, "parallel__dp_shard": 2}),
    "cp2_tp2": (4, {"parallel__cp": 2, "parallel__tp": 2, "parallel__dp_shard": 1}),
    "cp4": (4, {"parallel__cp": 4, "parallel__dp_shard": 1}),
}


def _reference(data: str, masked: bool, micro: int, tmp_path_factory) -> dict:
    key = (data, masked, micro)
    if key not in _refs:
        overrides = {"train__micro_batch": micro, "data__document_mask": str(masked).lower()}
        _refs[key] = train_collect(0, 1, data, str(tmp_path_factory.mktemp("ref")), overrides)
    return _refs[key]


def _case(layout: str, masked: bool):
    fast = layout == "cp2" and masked
    marks = () if fast else (pytest.mark.slow,)
    return pytest.param(
        layout, masked, marks=marks, id=f"{layout}-{'docs' if masked else 'causal'}"
    )


@pytest.mark.parametrize(
    "layout,masked", [_case(name, m) for name in LAYOUTS for m in (True, False)]
)
def test_cp_matches_single_process(
    layout, masked, byte_data, short_docs, tmp_path, tmp_path_factory
):  # noqa: F811
    world, degrees = LAYOUTS[layout]
    data = short_docs if masked else byte_data
    dp = world // (degrees["parallel__cp"] * degrees.get("parallel__tp", 1))
    micro = 8 // dp
    overrides = {**degrees, "train__micro_batch": micro, "data__document_mask": str(masked).lower()}
    got = run_workers(train_collect, world, data, str(tmp_path), overrides)
    assert_same_run(got[0], _reference(data, masked, 8, tmp_path_factory))
