"""The layout planner as users meet it: bad input, the `triaxis plan` command line, the snippet
it writes, and one vocabulary with the runtime (the formulas and search: tests/test_plan.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from tests.test_plan import _problem, catalog  # noqa: F401  (the fixture)
from triaxis.errors import UserError
from triaxis.plan.cli import main
from triaxis.plan.hardware import resolve_hardware
from triaxis.plan.problem import Layout, Problem, load_model
from triaxis.plan.runtimes import RUNTIMES

# -- bad input -------------------------------------------------------------------------------


def test_unknown_names_list_the_known_ones(catalog):
    with pytest.raises(UserError, match="a100-80g.*h100") as e:
        resolve_hardware(catalog, "h1000", None)
    assert "did you mean 'h100'" in str(e.value)
    with pytest.raises(UserError, match="p4d.*p5"):
        resolve_hardware(catalog, None, "p9")
    with pytest.raises(UserError, match="presets are"):
        load_model("7b")


@pytest.mark.slow
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


def test_an_moe_model_is_planned_with_all_its_experts_not_as_dense(capsys):
    """Once `plan --model mixtral-8x7b` priced a dense 8B-like model (the experts dropped), then
    refused it; now every expert is in its memory (tests/test_plan_moe.py has the rest)."""
    code = main(["--model", "mixtral-8x7b", "--gpus", "8", "--gpu", "h100"])
    out = capsys.readouterr().out
    assert code == 0
    assert "mixtral-8x7b (46.70B parameters)" in out and " ep=" in out
