"""Unit tests of the layout planner (triaxis.plan): formulas against hand computation,
enumeration rules, objectives, bad input, and the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from triaxis.errors import UserError
from triaxis.model.llama import flops_per_token
from triaxis.model.presets import PRESETS
from triaxis.plan.cli import main
from triaxis.plan.evidence import row_shape
from triaxis.plan.hardware import load_catalog, resolve_hardware
from triaxis.plan.memory import (
    layer_activation_bytes_per_token,
    logits_bytes_per_token,
    loss_bytes,
    predict_state_bytes_per_rank,
)
from triaxis.plan.problem import RUNTIMES, Layout, ModelShape, Problem, load_model, shape_from_args
from triaxis.plan.search import SearchSpace, enumerate_layouts, evaluate, plan
from triaxis.plan.steptime import (
    AxisLink,
    all_gather_s,
    all_reduce_s,
    axis_link,
    bubble_slots,
    gemm_s,
)


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


# -- bad input -------------------------------------------------------------------------------


def test_unknown_names_list_the_known_ones(catalog):
    with pytest.raises(UserError, match="a100-80g.*h100") as e:
        resolve_hardware(catalog, "h1000", None)
    assert "did you mean 'h100'" in str(e.value)
    with pytest.raises(UserError, match="p4d.*p5"):
        resolve_hardware(catalog, None, "p9")
    with pytest.raises(UserError, match="presets are"):
        load_model("7b")


def test_too_big_model_says_what_would_fit(capsys):
    code = main(
        [
            "--model",
            "405b",
            "--gpus",
            "8",
            "--gpu",
            "a100-40g",
            "--seq",
            "4096",
            "--global-batch",
            "64",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit on 8 x a100-40g" in err and "the leanest (" in err
    found = re.search(r"smallest cluster that fits is (\d+) x a100-40g", err)
    assert found, err
    smallest = int(found.group(1))
    # 6.5 TB of fp32 states: even offloaded, 8 hosts of 1152 GiB are needed.
    assert 16 < smallest <= 256 and math.log2(smallest).is_integer()
    batch = re.search(r"global batch scaled to (\d+)", err).group(1)
    assert (
        main(
            [
                "--model",
                "405b",
                "--gpus",
                str(smallest),
                "--gpu",
                "a100-40g",
                "--seq",
                "4096",
                "--global-batch",
                batch,
                "--top",
                "1",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "--model",
                "405b",
                "--gpus",
                str(smallest // 2),
                "--gpu",
                "a100-40g",
                "--seq",
                "4096",
                "--global-batch",
                str(int(batch) // 2),
            ]
        )
        == 2
    )


def test_excluded_options_are_named_when_they_would_fit(capsys):
    """8B on 2 x 40 GB: 64 GB of states per GPU, but offloaded to the host it fits."""
    code = main(
        [
            "--model",
            "8b",
            "--gpus",
            "2",
            "--gpu",
            "a100-40g",
            "--seq",
            "2048",
            "--global-batch",
            "16",
            "--no-offload",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "fits on these 2 GPUs with CPU offload" in err


def test_batch_that_no_layout_divides(capsys):
    code = main(
        [
            "--model",
            "tiny",
            "--gpus",
            "3",
            "--gpu",
            "h100",
            "--global-batch",
            "8",
            "--seq",
            "128",
            "--no-pipeline",
        ]
    )
    assert code == 2
    assert "divides the global batch 8" in capsys.readouterr().err


# -- command line -------------------------------------------------------------------------------


def test_cli_text_output_and_snippet_loads(capsys, tmp_path):
    from triaxis.config import load_config

    out_file = tmp_path / "plan.toml"
    code = main(
        [
            "--model",
            "8b",
            "--gpus",
            "64",
            "--gpu",
            "h100",
            "--cluster",
            "p5",
            "--seq",
            "4096",
            "--global-batch",
            "256",
            "--top",
            "3",
            "--write",
            str(out_file),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for text in ("memory per GPU (GiB)", "dp_replicate", "bubble", "Why #1:", "[parallel]", "MFU"):
        assert text in out
    cfg = load_config(str(out_file))  # every key is a real config field
    assert (
        cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp_shard * cfg.parallel.dp_replicate == 64
    )


def test_cli_json_is_parseable(capsys):
    assert (
        main(
            [
                "--model",
                "8b",
                "--gpus",
                "16",
                "--gpu",
                "a100-80g",
                "--seq",
                "2048",
                "--global-batch",
                "64",
                "--json",
                "--top",
                "2",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 16 and data["cluster"] == "p4de" and len(data["plans"]) == 2
    best = data["plans"][0]
    assert set(best["memory_gib"]) >= {
        "params",
        "grads",
        "optim",
        "activations",
        "comm_buffers",
        "total",
    }
    assert set(best["time_s"]["exposed_comm"]) >= {"tp", "dp_shard", "dp_replicate", "pp"}
    assert 0 < best["mfu"] < 1 and best["memory_gib"]["total"] <= data["usable_memory_gib"]
    assert "[parallel]" in data["toml"]


def test_plan_for_world_on_cpu_writes_the_config():
    from triaxis.config import Config
    from triaxis.parallel.dims import ParallelDims
    from triaxis.plan.auto import plan_for_world

    cfg = Config()
    cfg.model.preset, cfg.data.seq_len, cfg.train.global_batch = "tiny", 64, 8
    before = cfg.to_dict()
    planned, best, why = plan_for_world(cfg, 4, "memory", gpu="cpu", gpus_per_node=4)
    assert cfg.to_dict() == before  # a new config; the caller's is left as it was
    cfg = planned
    p = cfg.parallel
    ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, 4)  # a valid layout of 4 ranks
    assert p.cpu_offload is False  # no offload on CPU
    # The whole layout, pipeline included (memory picks one for the untied tiny model).
    assert (p.pp, p.pp_virtual_stages) == (best.layout.pp, best.layout.virtual_stages) and p.pp > 1
    assert p.pp_schedule == best.layout.schedule and p.pp_layers
    assert cfg.train.micro_batch == best.layout.micro_batch
    assert cfg.train.global_batch % (cfg.train.micro_batch * p.dp_replicate * p.dp_shard) == 0
    assert "parallel.auto=memory on 4 x cpu" in why
    with pytest.raises(UserError, match="objective"):
        plan_for_world(cfg, 4, "fastest", gpu="cpu")


# -- one vocabulary with the runtime -----------------------------------------------------------


def test_planner_schedules_are_the_runtime_schedules():
    from triaxis.parallel.partition import MULTI, SINGLE
    from triaxis.plan.problem import SCHEDULES

    assert set(SCHEDULES) <= set(SINGLE) | set(MULTI)


def test_step_time_columns_are_the_mesh_axes_innermost_first():
    from triaxis.parallel.dims import AXES
    from triaxis.plan.report import COMM_COLUMNS

    assert COMM_COLUMNS == tuple(reversed(AXES))


@pytest.mark.parametrize("schedule", ["zbv", "interleaved-zb"])
def test_zero_bubble_snippet_runs_as_written(tmp_path, capsys, schedule):
    """The winner's TOML names the schedule the planner modelled, with the stages per rank the
    runtime needs, and passes the runtime's schedule rules."""
    from triaxis.config import load_config
    from triaxis.parallel.pipeline import check_schedule

    out = tmp_path / "plan.toml"
    assert (
        main(
            [
                "--model",
                "70b",
                "--gpus",
                "64",
                "--gpu",
                "a100-40g",
                "--no-offload",
                "--schedules",
                schedule,
                "--top",
                "1",
                "--write",
                str(out),
            ]
        )
        == 0
    )
    assert f"{schedule}" in capsys.readouterr().out
    cfg = load_config(str(out))
    p, t = cfg.parallel, cfg.train
    assert p.pp > 1 and p.pp_schedule == schedule and p.pp_virtual_stages == 2
    check_schedule(
        p.pp_schedule,
        p.pp,
        p.pp_virtual_stages,
        t.global_batch // (t.micro_batch * p.dp_replicate * p.dp_shard),
    )


def test_a_pipelined_fsdp_stage_keeps_its_blocks_gathered_and_reduces_once(catalog):
    """torch's pipeline schedules keep a stage's FSDP blocks gathered after backward and their
    gradients unsharded until the last micro-batch: the stage's whole gathered blocks and
    unsharded gradients are in its peak, and the reduce-scatter is paid once per step."""
    from triaxis.plan.memory import memory_of
    from triaxis.plan.steptime import time_of

    shape, _ = load_model("8b")
    hw = resolve_hardware(catalog, "h100", "p5", None)
    p = Problem(shape, hw, RUNTIMES["triaxis"], 4096, 64)
    piped = Layout(1, 4, 1, 2, 1, "full", schedule="1f1b")
    m = piped.num_micro_batches(64)
    blocks = shape.n_layers // 2
    unit = shape.block_params()
    gathered = memory_of(p, piped, m).comm_buffers
    # bf16 gathered copies and fp32 unsharded gradients of the stage's 16 blocks at least.
    assert gathered >= (2 + 4) * blocks * unit
    # Kept gathered from forward to backward, the stage gathers and reduces once per step, so
    # twice the micro-batches expose no more dp_shard time.
    kept = dataclasses.replace(piped, reshard_after_forward=False)
    once = time_of(p, kept, m).exposed_comm["dp_shard"]
    assert once > 0 and time_of(p, kept, 2 * m).exposed_comm["dp_shard"] == pytest.approx(once)
