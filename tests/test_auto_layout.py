"""parallel.auto runs the whole layout `triaxis plan` chooses, pipelines included, and trains
like one process.

The parent plans (plan_for_world, the function `triaxis plan`'s snippet shares its mapping
with); the workers train with parallel.auto, so the trainer plans for itself. Both must agree on
every [parallel] field, and the losses must match the single-process run's (1e-5). The memory
objective on the cpu profile is the memory-bound case: it picks a pipeline (pp > 1)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, make_config, train_collect

# 8 untied blocks: a pipeline may hold 2 stages on each of 4 ranks.
MODEL = {"model__tie_embeddings": "false", "model__n_layers": 8}


def planned(data: str, run_dir: str, world: int, objective: str):
    """What `triaxis plan` picks for this run: (its ParallelConfig, micro-batch, layout)."""
    from triaxis.data.dataset import TokenDataset
    from triaxis.model import build_model_args
    from triaxis.plan.auto import plan_for_world

    cfg = make_config(data, run_dir, **MODEL)
    vocab = TokenDataset(data, "train", cfg.data.seq_len, 0).manifest["tokenizer"]["vocab_size"]
    args = build_model_args(cfg.model, vocab_size=vocab)
    new, best, _ = plan_for_world(
        cfg, world, objective, gpu="cpu", gpus_per_node=world, model_args=args
    )
    return new.parallel, new.train.micro_batch, best.layout


def run_auto(data, tmp_path, tmp_path_factory, world: int, objective: str):
    par, micro, layout = planned(data, str(tmp_path), world, objective)
    from triaxis.plan.auto import auto_layout

    got = run_workers(
        train_collect,
        world,
        data,
        str(tmp_path),
        {**MODEL, "parallel__auto": objective},
        auto_layout,
        timeout_s=300,
    )
    # The trainer ran exactly the printed plan: every [parallel] field and the micro-batch.
    for r in got:
        assert dataclasses.replace(r["parallel"], auto="off") == par
        assert r["micro_batch"] == micro
        assert r["losses"] == got[0]["losses"]
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:
        merged["params"].update(r["params"])
    # The reference runs in a worker too: a parent that has trained forks unreliably (torch's
    # threads; a world-8 run once died in malloc after an in-process reference).
    (ref,) = run_workers(
        train_collect,
        1,
        data,
        str(tmp_path_factory.mktemp("ref")),
        {**MODEL, "train__micro_batch": micro},
        timeout_s=300,
    )
    assert_same_run(merged, ref)
    return layout


@pytest.mark.slow
def test_auto_memory_world4_runs_the_planned_pipeline(byte_data, tmp_path, tmp_path_factory):
    layout = run_auto(byte_data, tmp_path, tmp_path_factory, 4, "memory")
    assert layout.pp > 1, layout.describe()


@pytest.mark.slow
def test_auto_speed_world4_matches_one_process(byte_data, tmp_path, tmp_path_factory):
    run_auto(byte_data, tmp_path, tmp_path_factory, 4, "speed")


@pytest.mark.slow
def test_auto_memory_world8_runs_the_planned_pipeline(byte_data, tmp_path, tmp_path_factory):
    layout = run_auto(byte_data, tmp_path, tmp_path_factory, 8, "memory")
    assert layout.pp > 1 and layout.tp > 1, layout.describe()
