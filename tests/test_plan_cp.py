"""The planner prices context parallelism: activations divide by cp, the ring's traffic and the
attention over the other ranks' keys are counted, long sequences choose cp, and the snippet of
a cp plan is a layout the trainer accepts."""

from __future__ import annotations

import dataclasses

import pytest

from triaxis.plan.context import cp_memory_of, cp_time_of, pp_cp_pairs
from triaxis.plan.hardware import load_catalog, resolve_hardware
from triaxis.plan.problem import Layout, Problem
from triaxis.plan.runtimes import RUNTIMES
from triaxis.plan.search import SearchSpace, enumerate_layouts, plan


def _problem(seq: int, batch: int = 8, gpus_per_node: int = 8) -> Problem:
    from triaxis.model import PRESETS
    from triaxis.plan.problem import shape_from_args

    args = dataclasses.replace(PRESETS["8b"], max_seq_len=seq)
    hw = resolve_hardware(load_catalog(), "h100", None, gpus_per_node)
    return Problem(shape_from_args(args, "8b"), hw, RUNTIMES["triaxis"], seq, batch)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_activation_memory_divides_by_cp(cp):
    """The part of activation memory that grows with the sequence divides by cp (the fused
    loss's fixed chunk does not grow): the growth from T to 2T is 1/cp of one process's."""

    def activations(seq: int, cp: int) -> float:
        layout = Layout(1, 8 // cp, 1, 1, 1, "full", cp=cp)
        return cp_memory_of(_problem(seq), layout, 8).activations

    growth = activations(65536, 1) - activations(32768, 1)
    assert activations(65536, cp) - activations(32768, cp) == pytest.approx(growth / cp, rel=0.01)
    assert activations(32768, cp) < activations(32768, 1)
    # The same 8 GPUs shard the states either way (dp_shard x cp = 8).
    one = cp_memory_of(_problem(32768), Layout(1, 8, 1, 1, 1, "full"), 8)
    split = cp_memory_of(_problem(32768), Layout(1, 8 // cp, 1, 1, 1, "full", cp=cp), 8)
    assert split.params == pytest.approx(one.params)


def test_step_time_counts_whole_attention_and_the_ring():
    p = _problem(131072)
    t1 = cp_time_of(p, Layout(1, 1, 1, 1, 1, "full"), 8)
    t8 = cp_time_of(p, Layout(1, 1, 1, 1, 1, "full", cp=8), 8)
    # Each rank computes 1/8 of the tokens and of the attention, not 1/64 of the attention.
    assert t8.compute == pytest.approx(t1.compute / 8, rel=0.05)
    assert t8.exposed_comm["cp"] >= 0.0
    # Across nodes (EFA) with little compute per ring step, the ring is exposed.
    short = _problem(4096, gpus_per_node=2)
    across = cp_time_of(short, Layout(1, 1, 1, 1, 1, cp=8), 8)
    inside = cp_time_of(_problem(4096), Layout(1, 1, 1, 1, 1, cp=8), 8)
    assert across.exposed_comm["cp"] > inside.exposed_comm["cp"]


def test_cp_pairs_follow_the_trainer_rules():
    pairs = list(pp_cp_pairs(8, 8, 0, seq_len=20))
    assert (1, 2) in pairs and (1, 4) not in pairs  # 20 splits into 4 chunks, not 8
    assert (2, 2) in pairs and (4, 2) in pairs and (2, 4) not in pairs  # cp inside pipelines too
    assert all(8 % (pp * cp) == 0 for pp, cp in pairs)  # pp x cp divides the ranks
    assert list(pp_cp_pairs(8, 8, 1, seq_len=4096)) == [(d, 1) for d in (1, 2, 4, 8)]


def test_long_sequences_choose_cp_and_the_snippet_runs(tmp_path):
    from triaxis.config import load_config
    from triaxis.model import PRESETS
    from triaxis.parallel.rules import check_layout
    from triaxis.plan.report import toml_snippet

    p = _problem(131072)
    space = SearchSpace(max_cp=0)
    assert any(x.cp > 1 for x in enumerate_layouts(p.shape, 8, 8, 8, space, p.seq_len))
    result = plan(p, 8, "speed", space, keep=3)
    best = result.plans[0]
    assert best.layout.cp > 1, best.layout.describe()
    path = tmp_path / "plan.toml"
    path.write_text(toml_snippet(result, best) + '\n[model]\npreset = "8b"\n')
    cfg = load_config(str(path), ["--model.max_seq_len=131072", "--data.path=synthetic"])
    assert cfg.parallel.cp == best.layout.cp
    args = dataclasses.replace(PRESETS["8b"], max_seq_len=131072)
    assert check_layout(cfg, 8, args).cp == best.layout.cp
    # A bare search space plans without cp, as before.
    assert all(x.cp == 1 for x in enumerate_layouts(p.shape, 8, 8, 8, SearchSpace(), p.seq_len))


def test_cp_with_a_pipeline_prices_each_stage_on_its_share_of_the_sequence(tmp_path):
    """cp x pp: every stage computes its blocks on T/cp tokens, so the sequence-bound part of
    its activation memory divides by cp; the plan's snippet is a layout the trainer accepts."""
    from triaxis.config import load_config
    from triaxis.model import PRESETS
    from triaxis.parallel.rules import check_layout
    from triaxis.plan.report import toml_snippet
    from triaxis.plan.search import evaluate

    def activations(seq: int, cp: int) -> float:
        layout = Layout(1, 4 // cp, 1, 2, 1, "full", schedule="1f1b", cp=cp)
        return cp_memory_of(_problem(seq), layout, 8).activations

    growth = activations(65536, 1) - activations(32768, 1)
    assert activations(65536, 2) - activations(32768, 2) == pytest.approx(growth / 2, rel=0.01)
    p = _problem(131072)
    space = SearchSpace(max_cp=0)
    both = [x for x in enumerate_layouts(p.shape, 8, 8, 8, space, p.seq_len) if x.cp > 1 < x.pp]
    assert both, "the search never tries cp inside a pipeline"
    best = min((evaluate(p, x) for x in both), key=lambda q: q.time.total)
    assert best.time.exposed_comm["cp"] >= 0.0
    result = plan(p, 8, "speed", space, keep=3)
    path = tmp_path / "plan.toml"
    path.write_text(toml_snippet(result, best) + '\n[model]\npreset = "8b"\n')
    overrides = [
        "--model.max_seq_len=131072",
        "--data.path=synthetic",
        "--model.tie_embeddings=false",
    ]
    cfg = load_config(str(path), overrides)
    args = dataclasses.replace(PRESETS["8b"], max_seq_len=131072, tie_embeddings=False)
    dims = check_layout(cfg, 8, args)
    assert (dims.cp, dims.pp) == (best.layout.cp, best.layout.pp)
