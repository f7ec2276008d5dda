"""The planner prices mixtures of experts: all experts in memory (counted against what the
runtime's ranks hold), the active experts in the FLOPs, the all-to-all of expert parallelism on
the link its group spans; `ep` is searched, printed, mapped onto the trainer's [parallel] and run
like one process."""

from __future__ import annotations

import dataclasses

import pytest

from tests.dist import run_workers
from tests.parity import assert_same_run, make_config, train_collect
from triaxis.model.args import flops_per_token, param_counts
from triaxis.model.presets import PRESETS
from triaxis.plan.experts import all_to_all_bytes, ep_degrees, moe_time_of
from triaxis.plan.hardware import load_catalog, resolve_hardware
from triaxis.plan.layouts import SearchSpace, enumerate_layouts
from triaxis.plan.mapping import parallel_config
from triaxis.plan.memory import predict_state_bytes_per_rank
from triaxis.plan.problem import Layout, Problem, shape_from_args
from triaxis.plan.runtimes import RUNTIMES
from triaxis.plan.search import evaluate

MOE = {"model__preset": "tiny-moe"}


def problem(preset: str, gpus_per_node: int = 8, seq: int = 4096, batch: int = 256) -> Problem:
    hw = resolve_hardware(load_catalog(), "h100", "p5", gpus_per_node)
    shape = shape_from_args(PRESETS[preset], preset)
    return Problem(shape, hw, RUNTIMES["triaxis"], seq, batch)


def test_memory_counts_every_expert_and_flops_the_active_ones():
    p = problem("mixtral-8x7b")
    counts = param_counts(PRESETS["mixtral-8x7b"])
    assert p.shape.total_params() == counts["total"] > 46e9  # every expert
    dense = dataclasses.replace(p.shape, n_experts=0)
    assert dense.total_params() < 8e9
    # MFU's FLOPs: 6 x the active parameters (2 of 8 experts) + attention.
    assert p.shape.model_flops_per_token(4096) == flops_per_token(PRESETS["mixtral-8x7b"], 4096)
    assert 6 * 12e9 < p.shape.model_flops_per_token(4096) < 6 * 14e9
    # States of one rank of a dp_shard=8 group hold 1/8 of all 46.7B parameters, whatever ep.
    for ep in (1, 2, 8):
        plan = evaluate(p, Layout(1, 8, 1, 1, 1, "full", ep=ep), with_time=False)
        assert plan.memory.params == pytest.approx(4 * counts["total"] / 8, rel=0.01)
    # ...but ep shrinks what a rank gathers per block: its own experts only.
    comm = [evaluate(p, Layout(1, 8, 1, 1, 1, "full", ep=ep)).memory.comm_buffers for ep in (1, 8)]
    assert comm[1] < comm[0] / 3


def test_all_to_all_is_priced_on_the_link_its_group_spans():
    p = problem("mixtral-8x7b", batch=512)
    lay = Layout(1, 16, 1, 1, 1, "full", ep=8)
    s = p.shape
    # k x T x (ep - 1) / ep rows of dim bf16 elements per all-to-all, per rank.
    assert all_to_all_bytes(p, lay) == 2 * 4096 * 7 / 8 * s.dim * 2
    n = lay.num_micro_batches(p.global_batch)
    inside = moe_time_of(p, lay, n).exposed_comm["ep"]
    assert inside > 0 and moe_time_of(p, dataclasses.replace(lay, ep=1), n).exposed_comm["ep"] == 0
    # ep=8 inside a node of 8 vs the same group spread over 2 nodes (4 GPUs per node): EFA.
    wide = problem("mixtral-8x7b", gpus_per_node=4, batch=512)
    assert moe_time_of(wide, lay, n).exposed_comm["ep"] > 2 * inside


def test_ep_is_searched_where_the_runtime_allows_it():
    shape = shape_from_args(PRESETS["tiny-moe"], "tiny-moe")  # 4 experts
    assert ep_degrees(shape, 8, 1) == [1, 2, 4]  # divides dp_shard and the experts
    assert ep_degrees(shape, 4, 2) == [1]  # not with cp
    assert ep_degrees(shape_from_args(PRESETS["tiny"], "tiny"), 8, 1) == [1]  # dense
    eps = {a.ep for a in enumerate_layouts(shape, 4, 4, 8, SearchSpace(max_micro_batch=8))}
    assert eps == {1, 2, 4}


def test_every_enumerated_moe_layout_passes_the_trainers_rules():
    from triaxis.parallel.rules import check_layout

    args = dataclasses.replace(PRESETS["tiny-moe"], vocab_size=512)
    shape = shape_from_args(args, "tiny-moe")
    seen = set()
    for world in (2, 4):
        for a in enumerate_layouts(shape, world, world, 8, SearchSpace(max_micro_batch=8)):
            cfg = make_config("synthetic", "unused", **MOE)
            cfg.data.seq_len, cfg.train.global_batch = 32, 8
            cfg.train.micro_batch = a.micro_batch
            cfg.parallel = parallel_config(a, args.n_layers)
            dims = check_layout(cfg, world, args)
            assert (dims.ep, dims.dp_shard, dims.tp, dims.pp) == (a.ep, a.dp_shard, a.tp, a.pp)
            seen.add(a.ep)
    assert seen == {1, 2, 4}


def test_plan_cli_explains_ep(capsys):
    from triaxis.cli import main

    assert main(["plan", "--model", "mixtral-8x7b", "--gpus", "16", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    header = next(x for x in out.splitlines() if x.split()[:2] == ["#", "compute"])
    assert header.split()[2:7] == ["tp", "cp", "ep", "dp_shard", "dp_replicate"]
    why = next(x for x in out.splitlines() if x.startswith("Why #1"))
    assert "ep=8 splits each MoE block's 8 experts over 8 GPUs" in why
    assert "ep=1 does not fit" in why
    assert "\nep = 8\n" in out  # the snippet the trainer runs


def _vocab(data: str) -> int:
    from triaxis.data.dataset import TokenDataset

    return TokenDataset(data, "train", 32, 0).manifest["tokenizer"]["vocab_size"]


def _measure(rank: int, world: int, data: str, run_dir: str, overrides: dict) -> dict:
    from tests.parity import local_state_bytes
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    trainer = Trainer(make_config(data, run_dir, **overrides), init_distributed("cpu"))
    trainer.fit()
    return local_state_bytes(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("tp,dp_shard,ep", [(1, 4, 2), (2, 2, 2), (1, 2, 1)])
def test_predicted_moe_state_bytes_match_every_rank(byte_data, tmp_path, tp, dp_shard, ep):
    degrees = {"parallel__tp": tp, "parallel__dp_shard": dp_shard, "parallel__ep": ep}
    world = tp * dp_shard
    got = run_workers(
        _measure,
        world,
        byte_data,
        str(tmp_path),
        {**MOE, **degrees, "train__steps": 1, "train__micro_batch": 8 // dp_shard},
        timeout_s=300,
    )
    args = dataclasses.replace(PRESETS["tiny-moe"], vocab_size=_vocab(byte_data))
    for rank, measured in enumerate(got):
        pred = predict_state_bytes_per_rank(args, dp_shard, 1, tp, 1, ep=ep, rank=rank)
        assert measured["params"] == pred["params"], (rank, measured, pred)
        assert measured["optim"] == 2 * pred["params"], (rank, measured, pred)


@pytest.mark.slow
def test_a_planned_ep_layout_trains_like_one_process(byte_data, tmp_path_factory):
    """The fastest ep=2 layout of 2 ranks, as `triaxis plan` maps it, against one process."""
    args = dataclasses.replace(PRESETS["tiny-moe"], vocab_size=_vocab(byte_data))
    hw = resolve_hardware(load_catalog(), "cpu", None, 2)
    p = Problem(shape_from_args(args, "tiny-moe"), hw, RUNTIMES["triaxis"], 32, 8)
    mine = [a for a in enumerate_layouts(p.shape, 2, 2, 8, SearchSpace()) if a.ep == 2]
    best = min((evaluate(p, a) for a in mine), key=lambda q: q.time.total).layout
    par = parallel_config(best, args.n_layers)
    fields = {f"parallel__{k}": v for k, v in dataclasses.asdict(par).items() if k != "auto"}
    overrides = {**MOE, "train__micro_batch": best.micro_batch}
    got = run_workers(
        train_collect, 2, byte_data, str(tmp_path_factory.mktemp("run")), {**overrides, **fields},
        timeout_s=300,
    )  # fmt: skip
    assert got[0]["parallel"].ep == 2
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:
        merged["params"].update(r["params"])
    (ref,) = run_workers(
        train_collect, 1, byte_data, str(tmp_path_factory.mktemp("ref")), overrides, timeout_s=300
    )
    assert_same_run(merged, ref)


@pytest.mark.slow
def test_parallel_auto_plans_an_moe_run(byte_data, tmp_path, tmp_path_factory):
    from triaxis.plan.auto import auto_layout

    got = run_workers(
        train_collect, 2, byte_data, str(tmp_path), {**MOE, "parallel__auto": "speed"},
        auto_layout, timeout_s=300,
    )  # fmt: skip
    micro = got[0]["micro_batch"]
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:
        merged["params"].update(r["params"])
    (ref,) = run_workers(
        train_collect, 1, byte_data, str(tmp_path_factory.mktemp("ref")),
        {**MOE, "train__micro_batch": micro}, timeout_s=300,
    )  # fmt: skip
    assert_same_run(merged, ref)
