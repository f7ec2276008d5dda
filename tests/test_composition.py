"""One rule decides what composes: every pair of the options the planner searches either trains
like one process or is refused in one line, by the rule the planner and the trainer share
(config.composition_problem, raised by parallel.rules.check_layout).

The pairs are those of plan.problem.SEARCHED_OPTIONS (two knobs, a value of each). A pair is
refused when every assignment of the other knobs that contains it is refused; the rest are
covered by a few runs, each setting all six knobs at once (a greedy covering array: every
composable pair appears in at least one run), at world 4: pp=2 x dp_shard=2, a tiny 4-block
model, 5 steps, compared with one process. Hierarchical gathers run with nodes of one rank
(LOCAL_WORLD_SIZE=1), so the dp_shard group spans nodes."""

from __future__ import annotations

import itertools
import os

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, make_config, train_collect
from triaxis.config import composition_problem
from triaxis.errors import UserError
from triaxis.plan.problem import SEARCHED_OPTIONS

KNOBS = list(SEARCHED_OPTIONS)
N_LAYERS, WORLD = 4, 4
BASE = {"model__tie_embeddings": "false", "model__n_layers": N_LAYERS, "train__micro_batch": 1}


def overrides(knobs: dict) -> dict:
    """The trainer's [parallel] fields for one assignment of the searched knobs (the values
    plan.mapping.parallel_config gives them), at pp=2 x dp_shard=2."""
    ac = knobs["activation_checkpoint"]
    schedule = knobs["schedule"]
    return {
        **BASE,
        "parallel__pp": 2,
        "parallel__dp_shard": 2,
        "parallel__pp_schedule": schedule,
        "parallel__pp_virtual_stages": 1 if schedule in ("gpipe", "1f1b") else 2,
        "parallel__activation_checkpoint": "selective" if ac == "op" else ac,
        "parallel__ac_selective": "op" if ac == "op" else "block",
        "parallel__ac_every": 1,
        "parallel__activation_offload": str(knobs["offload_checkpoints"]).lower(),
        "parallel__cpu_offload": str(knobs["cpu_offload"]).lower(),
        "parallel__reshard_after_forward": str(knobs["reshard_after_forward"]).lower(),
        "parallel__hierarchical": "on" if knobs["hierarchical"] else "off",
    }


def problem(knobs: dict) -> str | None:
    return composition_problem(make_config("unused", "unused", **overrides(knobs)).parallel)


ASSIGNMENTS = [dict(zip(KNOBS, values)) for values in itertools.product(*SEARCHED_OPTIONS.values())]
COMPOSABLE = [a for a in ASSIGNMENTS if problem(a) is None]


def pairs_of(knobs: dict) -> set:
    return {((k1, knobs[k1]), (k2, knobs[k2])) for k1, k2 in itertools.combinations(KNOBS, 2)}


ALL_PAIRS = set().union(*(pairs_of(a) for a in ASSIGNMENTS))
RUN_PAIRS = set().union(*(pairs_of(a) for a in COMPOSABLE))
REFUSED = sorted(ALL_PAIRS - RUN_PAIRS, key=str)


def covering_runs() -> list[dict]:
    """Few composable assignments that together hold every composable pair (greedy)."""
    todo, runs = set(RUN_PAIRS), []
    while todo:
        best = max(COMPOSABLE, key=lambda a: len(pairs_of(a) & todo))
        runs.append(best)
        todo -= pairs_of(best)
    return runs


RUNS = covering_runs()


def test_every_pair_runs_or_is_refused():
    assert len(ALL_PAIRS) == sum(
        len(SEARCHED_OPTIONS[a]) * len(SEARCHED_OPTIONS[b])
        for a, b in itertools.combinations(KNOBS, 2)
    )
    assert set().union(*(pairs_of(r) for r in RUNS)) == RUN_PAIRS
    assert RUN_PAIRS | set(REFUSED) == ALL_PAIRS
    # The refusals this rule makes today (a new one needs a look: is it a real limit?).
    assert {tuple(sorted(p)) for p in REFUSED} == {
        (("activation_checkpoint", "none"), ("offload_checkpoints", True)),
        (("activation_checkpoint", "op"), ("offload_checkpoints", True)),
        (("activation_checkpoint", "op"), ("schedule", "interleaved-zb")),
        (("activation_checkpoint", "op"), ("schedule", "zbv")),
        (("reshard_after_forward", True), ("schedule", "interleaved-zb")),
        (("reshard_after_forward", True), ("schedule", "zbv")),
    }


@pytest.mark.parametrize("pair", REFUSED, ids=lambda p: "+".join(f"{k}={v}" for k, v in p))
def test_a_refused_pair_is_one_line_from_check_layout(pair):
    from triaxis.model.presets import build_model_args
    from triaxis.parallel.rules import check_layout

    knobs = {k: v[0] for k, v in SEARCHED_OPTIONS.items()} | dict(pair)
    cfg = make_config("unused", "unused", **overrides(knobs))
    line = composition_problem(cfg.parallel)
    assert line is not None and "\n" not in line
    for k, v in pair:  # the line names both values, as the user spelled them
        spelled = {
            ("activation_checkpoint", "op"): "ac_selective=op",
            ("activation_checkpoint", "none"): "activation_checkpoint=none",
            ("offload_checkpoints", True): "activation_offload=true",
            ("reshard_after_forward", True): "reshard_after_forward=true",
        }.get((k, v), f"pp_schedule={v}")
        assert spelled in line.replace("'", ""), (spelled, line)
    assert any(fix in line for fix in ("set ", "use ", "--parallel."))
    with pytest.raises(UserError) as err:
        check_layout(cfg, WORLD, build_model_args(cfg.model))
    assert str(err.value) == line


def _train(rank, world, data, run_dir, knobs):
    if knobs["hierarchical"]:
        os.environ["LOCAL_WORLD_SIZE"] = "1"  # every rank a node: dp_shard groups span nodes
    return train_collect(rank, world, data, run_dir, overrides(knobs))


_ref: dict = {}


FAST = next(i for i, r in enumerate(RUNS) if r["schedule"] == "zbv" and r["hierarchical"])


def _marks(i: int):
    return () if i == FAST else (pytest.mark.slow,)  # one fast representative: zbv, MiCS


@pytest.mark.parametrize(
    "knobs",
    [
        pytest.param(r, marks=_marks(i), id="-".join(f"{v}" for v in r.values()))
        for i, r in enumerate(RUNS)
    ],
)
def test_composable_pairs_train_like_one_process(knobs, byte_data, tmp_path_factory):
    got = run_workers(
        _train, WORLD, byte_data, str(tmp_path_factory.mktemp("run")), knobs, timeout_s=600
    )
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:
        merged["params"].update(r["params"])
    if not _ref:
        (_ref["run"],) = run_workers(
            train_collect, 1, byte_data, str(tmp_path_factory.mktemp("ref")), BASE
        )
    assert_same_run(merged, _ref["run"])


def test_the_planner_never_emits_a_refused_pair(monkeypatch):
    """What the search enumerates (test_plan_runs' small models, world 1-8) passes the rule;
    without it the search would propose refused pairs (op-level checkpointing with zbv)."""
    from tests.test_plan_runs import ALL, UNTIED, layouts
    from triaxis.plan import layouts as enumeration
    from triaxis.plan.mapping import parallel_config

    for args, _, layout in ALL:  # as `triaxis plan` prints it and parallel.auto runs it
        assert composition_problem(parallel_config(layout, args.n_layers), layout.dp > 1) is None
    monkeypatch.setattr(enumeration, "composes", lambda layout: True)
    unruled = [a for w in (4, 8) for a in layouts(UNTIED, w)]
    assert any(a.activation_checkpoint == "op" and a.schedule == "zbv" for a in unruled)
    assert any(a.schedule == "zbv" and a.dp > 1 and a.reshard_after_forward for a in unruled)
