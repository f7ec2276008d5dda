"""Unit tests of the layout planner (triaxis.plan): formulas against hand computation,
enumeration rules and objectives (bad input and the command line: tests/test_plan_cli.py)."""

from __future__ import annotations

import dataclasses

import pytest

from triaxis.model.llama import flops_per_token
from triaxis.model.presets import PRESETS
from triaxis.plan.activations import (
    layer_activation_bytes_per_token,
    logits_bytes_per_token,
    loss_bytes,
)
from triaxis.plan.collectives import AxisLink, all_gather_s, all_reduce_s, axis_link
from triaxis.plan.evidence import row_shape
from triaxis.plan.hardware import load_catalog, resolve_hardware
from triaxis.plan.memory import predict_state_bytes_per_rank
from triaxis.plan.problem import Layout, ModelShape, Problem, load_model, shape_from_args
from triaxis.plan.runtimes import RUNTIMES
from triaxis.plan.search import SearchSpace, enumerate_layouts, evaluate, plan
from triaxis.plan.steptime import bubble_slots, gemm_s


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def _problem(catalog, model="70b", gpu="h100", cluster="p5", seq=4096, batch=1024):
    shape, _ = load_model(model)
    return Problem(shape, resolve_hardware(catalog, gpu, cluster), RUNTIMES["triaxis"], seq, batch)


# -- collectives -------------------------------------------------------------------------------


def test_ring_and_tree_formulas():
    link = AxisLink(size=8, per_node=8, bus_bytes_per_s=100e9, step_latency_s=0.0, launch_s=0.0)
    s = 1e9
    assert all_reduce_s(link, s) == pytest.approx(2 * 7 / 8 * s / 100e9)  # ring beats 2S/B tree
    assert all_gather_s(link, s) == pytest.approx(7 / 8 * s / 100e9)
    lat = AxisLink(size=8, per_node=8, bus_bytes_per_s=100e9, step_latency_s=1e-3, launch_s=0)
    # Tiny message: latency-bound; the tree's 2·log2(8)=6 steps beat the ring's 2·7=14.
    assert all_reduce_s(lat, 8.0) == pytest.approx(2 * 8 / 100e9 + 6e-3)
    assert all_gather_s(lat, 8.0) == pytest.approx(7 / 8 * 8 / 100e9 + 7e-3)
    assert all_reduce_s(AxisLink(1, 1, 1e9, 1e-3, 1e-3), s) == 0.0


def test_axis_placement_picks_the_link(catalog):
    hw = resolve_hardware(catalog, "h100", "p5")
    c = hw.cluster
    tp = axis_link(hw, 8, 1)  # tp innermost: one node
    assert (tp.per_node, tp.bus_bytes_per_s) == (8, c.nvlink_bytes_per_s)
    dp = axis_link(hw, 16, 8)  # one member per node: one NIC's share of the network
    assert dp.per_node == 1
    assert dp.bus_bytes_per_s == pytest.approx(c.network_bytes_per_s / 8)
    shard = axis_link(hw, 32, 2)  # 4 members per node drive 4 NICs' worth
    assert shard.per_node == 4
    assert shard.bus_bytes_per_s == pytest.approx(4 * c.network_bytes_per_s / 8)
    assert axis_link(hw, 4, 2).bus_bytes_per_s == c.nvlink_bytes_per_s  # 8 ranks: inside


def test_gemm_efficiency_grows_with_matrix_size(catalog):
    hw = resolve_hardware(catalog, "a100-80g", None)
    peak = hw.gpu.peak_flops

    def eff(m, n, k):
        return 2 * m * n * k / gemm_s(hw, m, n, k, 2) / peak

    assert eff(16384, 8192, 8192) == pytest.approx(hw.gpu.gemm_efficiency, rel=0.05)
    assert eff(2048, 2048, 96) < 0.5 * hw.gpu.gemm_efficiency  # attention scores, head dim 96
    assert eff(4096, 768, 6144) < eff(4096, 6144, 6144) < eff(16384, 8192, 8192)


# -- model shape and memory ------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "small", "8b", "70b"])
def test_flops_match_the_models_own_formula(preset):
    args = PRESETS[preset]
    shape = shape_from_args(args, preset)
    assert shape.model_flops_per_token(2048) == pytest.approx(flops_per_token(args, 2048))


def test_megatron_flop_convention():
    """Model FLOPs + the recomputed forward = 96·B·s·l·h²(1 + s/6h + V/16lh) / (B·s)."""
    row = {"name": "x", "dim": 12288, "n_layers": 80, "n_heads": 96, "vocab_size": 51200}
    shape, s = row_shape(row), 2048
    h, n, v = 12288, 80, 51200  # hidden size, layers, vocabulary
    paper = 96 * n * h * h * (1 + s / (6 * h) + v / (16 * n * h))
    ours = shape.model_flops_per_token(s) + shape.recompute_flops_per_token(s, n)
    assert ours == pytest.approx(paper, rel=1e-3)  # norm weights are the only difference


def test_korthikanti_activation_formula():
    """GPT, fp16, no recomputation: s·b·h·(34 + 5as/h) per layer; TP without SP: 10 + 24/t."""
    shape = ModelShape(
        "gpt",
        dim=6144,
        n_layers=40,
        n_heads=48,
        n_kv_heads=48,
        ffn_dim=4 * 6144,
        vocab_size=51200,
        gated_mlp=False,
        dropout=True,
    )
    rt, h, a, s = RUNTIMES["megatron-2021"], 6144, 48, 2048
    assert layer_activation_bytes_per_token(shape, rt, s, 1, 2) == 34 * h + 5 * a * s
    assert layer_activation_bytes_per_token(shape, rt, s, 8, 2) == pytest.approx(
        10 * h + 24 * h / 8 + 5 * a * s / 8
    )
    sp = dataclasses.replace(rt, name="megatron-sp", sequence_parallel=True)
    assert layer_activation_bytes_per_token(shape, sp, s, 8, 2) == pytest.approx(
        (34 * h + 5 * a * s) / 8
    )


def test_state_bytes_by_hand():
    """tiny: dim 64, 4 blocks, 4 heads / 2 KV heads (head dim 16), MLP 192, vocab 512."""
    args = PRESETS["tiny"]
    block = 64 * (64 + 32 + 32 + 64) + 3 * 64 * 192 + 2 * 64
    numel = 4 * block + 2 * 512 * 64 + 64
    full = predict_state_bytes_per_rank(args, 1, 1, 1, 1)
    assert full["params"] == full["grads"] == 4 * numel
    assert full["optim"] == 8 * numel + 4 * (4 * 9 + 3)  # moments + one step scalar a tensor
    assert predict_state_bytes_per_rank(args, 8, 1, 1, 1)["params"] == 4 * numel // 8
    # dp_shard = 3 pads dim 0 of every tensor to a multiple of 3: rank 0 holds ceil(rows / 3).
    c = lambda n: -(-n // 3)  # noqa: E731
    padded_block = 2 * c(64) + 2 * c(64) * 64 + 2 * c(32) * 64 + 2 * c(192) * 64 + c(64) * 192
    padded = 4 * padded_block + 2 * c(512) * 64 + c(64)
    assert predict_state_bytes_per_rank(args, 3, 1, 1, 1)["params"] == 4 * padded
    # dp_replicate copies, it does not split.
    assert predict_state_bytes_per_rank(args, 2, 4, 1, 1) == predict_state_bytes_per_rank(
        args, 2, 1, 1, 1
    )
    # TP: norms replicated, everything else split; tied: the shared matrix counted once.
    tp2 = predict_state_bytes_per_rank(args, 1, 1, 2, 1)["params"]
    assert tp2 == 4 * ((numel - 9 * 64) // 2 + 9 * 64)
    tied = dataclasses.replace(args, tie_embeddings=True)
    assert predict_state_bytes_per_rank(tied, 1, 1, 1, 1)["params"] == 4 * (numel - 512 * 64)
    # TP without FSDP: the untied embedding's gradient comes back replicated (bench/plan_memory).
    assert predict_state_bytes_per_rank(args, 1, 1, 2, 1)["grads"] == tp2 + 4 * 512 * 64 // 2
    assert (
        predict_state_bytes_per_rank(args, 2, 1, 2, 1)["grads"]
        == predict_state_bytes_per_rank(args, 2, 1, 2, 1)["params"]
    )


def test_pipeline_stage_holds_its_share():
    args = PRESETS["8b"]
    whole = predict_state_bytes_per_rank(args, 1, 1, 1, 1)["params"]
    stages = [predict_state_bytes_per_rank(args, 1, 1, 1, 4, stage=s)["params"] for s in range(4)]
    assert sum(stages) == whole  # untied: every parameter lives on exactly one stage
    assert predict_state_bytes_per_rank(args, 1, 1, 1, 4)["params"] == max(stages)
    split = [7, 9, 9, 7]  # a partitioner's split: lighter end stages carry embedding and head
    custom = [
        predict_state_bytes_per_rank(args, 1, 1, 1, 4, stage=s, blocks_per_stage=split)["params"]
        for s in range(4)
    ]
    assert sum(custom) == whole and custom[1] == custom[2] == stages[1] * 9 // 8
    with pytest.raises(ValueError, match="blocks_per_stage"):
        predict_state_bytes_per_rank(args, 1, 1, 1, 4, blocks_per_stage=[8, 8, 8])


# -- enumeration and objectives ----------------------------------------------------------------


def test_enumeration_obeys_the_rules(catalog):
    shape, _ = load_model("70b")
    layouts = list(enumerate_layouts(shape, 1024, 8, 1024, SearchSpace()))
    assert 1000 < len(layouts) < 100_000  # bounded: planning stays interactive
    for a in layouts:
        assert a.world_size == 1024
        assert a.tp <= 8 and shape.n_kv_heads % a.tp == 0
        assert 1024 % (a.dp * a.micro_batch) == 0
        if a.schedule == "interleaved-1f1b":
            assert shape.n_layers % (a.pp * a.virtual_stages) == 0
        if a.cpu_offload or not a.reshard_after_forward:
            assert a.dp_shard > 1
        assert (a.pp == 1) == (a.schedule == "none")
    no_pp = list(enumerate_layouts(shape, 1024, 8, 1024, SearchSpace(max_pp=1)))
    assert {a.pp for a in no_pp} == {1}


def test_plan_keeps_only_fitting_layouts_and_ranks_them(catalog):
    r = plan(_problem(catalog, "8b", batch=256), 64, "speed", keep=10)
    assert r.plans and all(p.fits for p in r.plans)
    times = [p.time.total for p in r.plans]
    assert times == sorted(times)
    for p in r.plans:
        assert p.memory.total <= r.problem.hw.usable_memory_bytes
        assert p.time.total == pytest.approx(
            p.time.compute + sum(p.time.exposed_comm.values()) + p.time.bubble + p.time.optimizer
        )


def test_objectives_pick_different_winners(catalog):
    problem = _problem(catalog, "70b", batch=512)
    fast = plan(problem, 64, "speed").plans[0]
    lean = plan(problem, 64, "memory").plans[0]
    assert fast.layout != lean.layout
    assert fast.time.total < lean.time.total
    assert lean.memory.total < fast.memory.total


def test_memory_grows_with_micro_batch_and_shrinks_with_checkpointing(catalog):
    problem = _problem(catalog, "8b", batch=256)
    small = evaluate(problem, Layout(1, 64, 1, 1, 1, "none"))
    big = evaluate(problem, Layout(1, 64, 1, 1, 4, "none"))
    full = evaluate(problem, Layout(1, 64, 1, 1, 4, "full"))
    # The fused head + loss holds one 4096-token chunk's logits (bf16, fp32 and the bf16
    # gradient: 8 bytes x 128k vocab a token), whatever the micro-batch; not checkpointed. The
    # blocks' activations grow with the micro-batch; with
    # full checkpointing the 32 blocks keep only their inputs, plus one block recomputed.
    logits = loss_bytes(problem.shape, problem.runtime, 1, 2, 4 * 4096, whole_head=True)
    assert logits == loss_bytes(problem.shape, problem.runtime, 1, 2, 4096, whole_head=True)
    assert big.memory.activations - logits == pytest.approx(
        4 * (small.memory.activations - logits), rel=0.01
    )
    assert logits == 8 * 128256 * 4096
    # 4.2 GB instead of the plain head's 29.4 GB at 16k tokens.
    assert logits < logits_bytes_per_token(problem.shape, problem.runtime, 1, 2) * 4 * 4096 / 4
    blocks_full, blocks_none = (x.memory.activations - logits for x in (full, big))
    ckpt = 4 * 4096 * problem.shape.dim * 2  # one bf16 block input
    assert blocks_full == pytest.approx(32 * ckpt + blocks_none / 32)
    assert full.time.compute > big.time.compute  # the recomputed forward


def test_offloaded_checkpoints_leave_the_gpu_for_the_host(catalog):
    problem = _problem(catalog, "8b", batch=256)
    kept = evaluate(problem, Layout(1, 64, 1, 1, 4, "full"))
    off = evaluate(problem, Layout(1, 64, 1, 1, 4, "full", offload_checkpoints=True))
    ckpt = 4 * 4096 * problem.shape.dim * 2  # one bf16 block input
    # 32 block inputs move to the host; 2 stay (one in use, one in transit).
    assert kept.memory.activations - off.memory.activations == pytest.approx(30 * ckpt)
    assert off.memory.host_per_node == pytest.approx(32 * ckpt * 8)
    # A 128 MiB copy per block over PCIe hides behind the block's compute, except the first
    # prefetch of backward.
    assert 0 < off.time.exposed_comm["offload"] < 0.01 * off.time.total
    assert off.time.compute == kept.time.compute
    with pytest.raises(ValueError, match="activation_checkpoint='full'"):
        Layout(1, 64, 1, 1, 4, "selective", offload_checkpoints=True)


def test_bubble_per_schedule():
    base = Layout(1, 1, 1, 8, 1, "full", 2, "1f1b")
    assert bubble_slots(base) == 7
    assert bubble_slots(dataclasses.replace(base, schedule="gpipe")) == 7
    assert (
        bubble_slots(dataclasses.replace(base, schedule="interleaved-1f1b", virtual_stages=2))
        == 3.5
    )
    assert bubble_slots(dataclasses.replace(base, schedule="interleaved-zb")) == pytest.approx(
        7 / 3
    )
    assert bubble_slots(dataclasses.replace(base, schedule="zbv")) == 0


def test_a_slow_network_costs_time(catalog, tmp_path):
    slow = tmp_path / "slow.toml"
    slow.write_text(
        '[cluster.slow]\ngpu = "h100"\ngpus_per_node = 8\nnvlink_busbw_gbps = 360.0\n'
        "nvlink_latency_us = 1.0\nnetwork_gbit = 100.0\nnetwork_efficiency = 0.8\n"
        "network_latency_us = 30.0\nhost_gbps = 40.0\nhost_memory_gib = 2048.0\n"
    )
    fast_hw = resolve_hardware(catalog, "h100", "p5")
    slow_hw = resolve_hardware(load_catalog(slow), None, "slow")
    shape, _ = load_model("8b")
    layout = Layout(1, 64, 1, 1, 1, "none")
    t = [
        evaluate(Problem(shape, hw, RUNTIMES["triaxis"], 4096, 256), layout).time
        for hw in (fast_hw, slow_hw)
    ]
    assert t[1].exposed_comm["dp_shard"] > 5 * t[0].exposed_comm["dp_shard"]
    assert t[1].compute == t[0].compute
