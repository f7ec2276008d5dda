"""The planner never chooses what the trainer cannot run.

Walks `plan.problem.SEARCHED_OPTIONS` (every value the search may give each layout knob): the
search emits exactly those values; every layout it enumerates for small models, mapped by
`mapping.parallel_config` (what `triaxis plan` prints and parallel.auto runs), passes the
trainer's layout rules (`parallel.rules.check_layout`); and for each option value one layout of
a small model trains at world 2 like one process. A helper that adds a knob to the search adds
its values to the table, and this file then proves the trainer runs them."""

from __future__ import annotations

import dataclasses

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, make_config, train_collect
from triaxis.config import ParallelConfig
from triaxis.model.args import ModelArgs
from triaxis.plan.mapping import parallel_config
from triaxis.plan.problem import SEARCHED_OPTIONS, Layout, shape_from_args
from triaxis.plan.search import SearchSpace, enumerate_layouts

# A small untied model (8 blocks: 2 stages on each of 4 ranks) and a tied one (no pipeline).
UNTIED = ModelArgs(
    dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=256
)
TIED = dataclasses.replace(UNTIED, tie_embeddings=True)
SEQ, BATCH = 32, 8
# The full search space (offload included, as on a bf16 GPU), every micro-batch.
SPACE = SearchSpace(max_micro_batch=BATCH)


def layouts(args: ModelArgs, world: int) -> list[Layout]:
    # Nodes of 2 from world 4 on, so groups that span nodes (hierarchical gathers) are searched.
    per_node = 2 if world >= 4 else world
    return list(enumerate_layouts(shape_from_args(args, "small"), world, per_node, BATCH, SPACE))


def config_for(layout: Layout, args: ModelArgs):
    cfg = make_config("synthetic", "unused")
    cfg.model.preset = "tiny"
    cfg.data.seq_len, cfg.train.global_batch = SEQ, BATCH
    cfg.train.micro_batch = layout.micro_batch
    cfg.parallel = parallel_config(layout, args.n_layers, ParallelConfig())
    return cfg


ALL = [(args, w, a) for args in (UNTIED, TIED) for w in (1, 2, 4, 8) for a in layouts(args, w)]


def test_search_emits_exactly_the_tabled_options():
    emitted: dict[str, set] = {k: set() for k in SEARCHED_OPTIONS}
    for _, _, a in ALL:
        for knob in SEARCHED_OPTIONS:
            emitted[knob].add(getattr(a, knob))
    emitted["schedule"].discard("none")  # pp = 1
    for knob, values in SEARCHED_OPTIONS.items():
        assert emitted[knob] == set(values), (knob, emitted[knob], values)
    # The knobs the table does not list are degrees, sizes and counts, not options.
    listed = set(SEARCHED_OPTIONS) | {"ac_every", "virtual_stages", "micro_batch"}
    degrees = {"dp_replicate", "dp_shard", "cp", "tp", "pp", "ep"}
    assert {f.name for f in dataclasses.fields(Layout)} == listed | degrees


@pytest.mark.parametrize("world", [1, 2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_every_enumerated_layout_passes_the_trainers_rules(world):
    from triaxis.parallel.rules import check_layout

    mine = [(args, a) for args, w, a in ALL if w == world]
    assert mine and (world == 1 or any(a.pp > 1 for _, a in mine))
    for args, a in mine:
        dims = check_layout(config_for(a, args), world, args)  # raises what the trainer would
        assert (dims.pp, dims.tp, dims.dp_shard, dims.dp_replicate) == (
            a.pp,
            a.tp,
            a.dp_shard,
            a.dp_replicate,
        )


def _one_layout_per_option() -> list:
    """For each tabled (knob, value): the first layout of the untied model on 2 ranks with it."""
    world2 = layouts(UNTIED, 2)
    out = []
    for knob, values in SEARCHED_OPTIONS.items():
        for value in values:
            if knob == "hierarchical" and value:
                continue  # needs groups spanning nodes: tests/test_hierarchical.py, world 4
            pick = next((a for a in world2 if getattr(a, knob) == value), None)
            out.append(pytest.param(knob, value, pick, id=f"{knob}={value}"))
    return out


_runs: dict = {}
_refs: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("knob,value,layout", _one_layout_per_option())
def test_each_option_trains_like_one_process(knob, value, layout, byte_data, tmp_path_factory):
    assert layout is not None, f"no 2-rank layout of the small model has {knob}={value}"
    par = parallel_config(layout, UNTIED.n_layers)
    overrides = {
        "model__tie_embeddings": "false",
        "model__n_layers": UNTIED.n_layers,
        "train__micro_batch": layout.micro_batch,
    }
    if layout not in _runs:
        fields = {f"parallel__{k}": v for k, v in dataclasses.asdict(par).items() if k != "auto"}
        got = run_workers(
            train_collect,
            layout.world_size,
            byte_data,
            str(tmp_path_factory.mktemp("run")),
            {**overrides, **fields},
            timeout_s=300,
        )
        merged = {"losses": got[0]["losses"], "params": {}}
        for r in got:
            merged["params"].update(r["params"])
        _runs[layout] = merged
    if layout.micro_batch not in _refs:
        (_refs[layout.micro_batch],) = run_workers(
            train_collect, 1, byte_data, str(tmp_path_factory.mktemp("ref")), overrides
        )
    assert_same_run(_runs[layout], _refs[layout.micro_batch])


@pytest.mark.parametrize("objective", ["speed", "memory"])
def test_the_plans_of_real_models_pass_the_trainers_rules(objective):
    """What `triaxis plan` prints for a 70B on 256 H100s (pipelines, offload, interleaving among
    them) is what the trainer accepts, stage split included."""
    from triaxis.model.presets import PRESETS
    from triaxis.parallel.rules import check_layout
    from triaxis.plan.hardware import load_catalog, resolve_hardware
    from triaxis.plan.problem import Problem
    from triaxis.plan.runtimes import RUNTIMES
    from triaxis.plan.search import plan

    args = dataclasses.replace(PRESETS["70b"])
    hw = resolve_hardware(load_catalog(), "h100", "p5", None)
    problem = Problem(shape_from_args(args, "70b"), hw, RUNTIMES["triaxis"], 4096, 256)
    result = plan(problem, 256, objective, keep=20)
    assert objective == "speed" or any(p.layout.pp > 1 for p in result.plans)
    for p in result.plans:
        cfg = make_config("synthetic", "unused")
        cfg.model.preset, cfg.data.seq_len, cfg.train.global_batch = "70b", 4096, 256
        cfg.train.micro_batch = p.layout.micro_batch
        cfg.parallel = parallel_config(p.layout, args.n_layers)
        check_layout(cfg, 256, args)
