"""The planner's FP8 (triaxis plan --float8): rates from the hardware table, the converted
projections priced at them with their casts, the float8 all-gather, and the command line."""

from __future__ import annotations

import dataclasses

import pytest

from tests.test_plan import _problem, catalog  # noqa: F401  (the fixture)
from triaxis.config.sections import TrainConfig
from triaxis.errors import UserError
from triaxis.plan.cli import main
from triaxis.plan.collectives import all_gather_s, axis_link
from triaxis.plan.float8 import check_float8, converted, converted_block_params, fp8_gemm_s
from triaxis.plan.lora import block_linears
from triaxis.plan.problem import Layout, Problem
from triaxis.plan.search import evaluate
from triaxis.plan.steptime import _fsdp_collectives, block_time, gemm_s


def test_fp8_rates_come_from_the_table(catalog):
    for name in ("h100", "h200"):
        g = catalog.gpus[name]
        assert g.fp8_flops == pytest.approx(2 * g.peak_flops, rel=1e-3)  # dense FP8 = 2x bf16
    for name in ("a100-40g", "a100-80g", "cpu"):
        assert catalog.gpus[name].fp8_flops == 0
        hw = _problem(catalog, gpu=name, cluster=None).hw
        with pytest.raises(UserError, match=f"{name} has no FP8") as err:
            check_float8(hw, "tensorwise")
        assert "\n" not in str(err.value)


def test_min_dim_default_is_the_trainers():
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["float8_min_dim"]
    assert Problem.__dataclass_fields__["float8_min_dim"].default == field.default


def _blocks(p: Problem, recipe: str, tp: int = 2, mb: int = 1, min_dim: int = 1024):
    q = dataclasses.replace(p, float8=recipe, float8_min_dim=min_dim)
    s, rt = q.shape, q.runtime
    return block_time(s, rt, q.hw, mb, q.seq_len, tp, q.elem, 0, q.float8, q.float8_min_dim)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_converted_projections_are_priced_at_the_fp8_rate(catalog, recipe):
    """The forward saves, per converted projection, its bf16 GEMM time less its float8 GEMM time
    (casts included); backward saves twice that. Attention and elementwise time are unchanged."""
    p = _problem(catalog, model="8b")
    tp, t = 2, p.seq_len
    off, f8 = _blocks(p, "off", tp), _blocks(p, recipe, tp)
    saved = 0.0
    for _, n_in, n_out, colwise in block_linears(p.shape):
        n, k = (n_out / tp, n_in) if colwise else (n_out, n_in / tp)
        saved += gemm_s(p.hw, t, n, k, 2) - fp8_gemm_s(p.hw, t, n, k, 2, recipe)
    assert saved > 0  # 8b's GEMMs are wide enough to gain
    assert off.fwd_s - f8.fwd_s == pytest.approx(saved, rel=1e-9)
    assert off.bwd_s - f8.bwd_s == pytest.approx(2 * saved, rel=1e-9)
    assert f8.cheap_fwd_s == off.cheap_fwd_s


def test_rowwise_pays_the_calibrated_slowdown_and_casts_cost(catalog):
    p = _problem(catalog, model="8b")
    hw, m, n, k = p.hw, 8192.0, 4096.0, 4096.0
    compute = 2 * m * n * k / (hw.gpu.fp8_flops * hw.gpu.gemm_efficiency)
    memory = ((m * k + k * n) * (1 + 2 * 2 + 1) + m * n * 2) / hw.gpu.hbm_bytes_per_s
    assert fp8_gemm_s(hw, m, n, k, 2, "tensorwise") == pytest.approx(compute + memory)
    slow = hw.calib.float8_rowwise_slowdown
    assert slow > 1
    assert fp8_gemm_s(hw, m, n, k, 2, "rowwise") == pytest.approx(slow * compute + memory)
    # A small GEMM: the casts outweigh the halved multiply (why the size filter exists).
    assert fp8_gemm_s(hw, 256, 256, 256, 2, "tensorwise") > gemm_s(hw, 256, 256, 256, 2)


def test_size_filter_leaves_narrow_models_alone(catalog):
    p = _problem(catalog, model="8b")
    widest = max(max(i, o) for _, i, o, _ in block_linears(p.shape))
    assert _blocks(p, "tensorwise", min_dim=widest + 16) == _blocks(p, "off")
    # 8b: kv projections are 4096 -> 1024; min_dim 2048 converts all but wk and wv.
    names = [n for n, _, _ in converted(p.shape, 2048)]
    assert "attention.wk" not in names and "attention.wq" in names


def test_fp8_all_gather_halves_the_converted_weights_bytes(catalog):
    """Tensorwise under FSDP gathers the converted weights as 1 byte; rowwise does not."""
    p = _problem(catalog, model="8b")
    tp, ds = 1, 8
    link = axis_link(p.hw, ds, tp)
    blk = p.shape.block_params()
    conv = converted_block_params(p.shape, 1024)
    assert 0 < conv <= blk
    tw = dataclasses.replace(p, float8="tensorwise")
    rw = dataclasses.replace(p, float8="rowwise")
    assert _fsdp_collectives(tw, tp, ds)[0] == pytest.approx(all_gather_s(link, 2 * blk - conv))
    assert _fsdp_collectives(rw, tp, ds)[0] == pytest.approx(all_gather_s(link, 2 * blk))
    assert _fsdp_collectives(rw, tp, ds)[0] == _fsdp_collectives(p, tp, ds)[0]
    layout = Layout(dp_replicate=1, dp_shard=ds, tp=tp, pp=1, micro_batch=1)
    off, f8 = evaluate(p, layout), evaluate(tw, layout)
    assert f8.time.total < off.time.total
    assert f8.memory.total == off.memory.total  # Float8Linear saves its bf16 input


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--model", "8b", "--gpus", "64", "--top", "1", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_float8_auto_turns_it_on_where_it_pays_and_says_why(capsys):
    code, out, _ = _plan(capsys, "--gpu", "h100", "--float8", "auto")
    assert code == 0
    why = next(line for line in out.splitlines() if line.startswith("FP8: "))
    assert why.startswith("FP8: float8 tensorwise:") and "rowwise" in why
    assert 'float8 = "tensorwise"' in out  # the snippet turns it on
    code, bf16, _ = _plan(capsys, "--gpu", "h100")
    assert code == 0 and "float8" not in bf16


def test_cli_float8_on_a100(capsys):
    code, out, err = _plan(capsys, "--gpu", "a100-80g", "--float8", "auto")
    assert code == 0 and "FP8: float8 off: a100-80g has no FP8 matrix units" in out
    assert "float8 =" not in out
    code, out, err = _plan(capsys, "--gpu", "a100-80g", "--float8", "rowwise")
    assert code == 2 and out == "" and err.count("\n") == 1 and "no FP8 matrix units" in err


def test_cli_float8_on_a_model_too_narrow(capsys):
    args = ["--model", "small", "--seq", "1024", "--gpus", "8", "--gpu", "h100", "--top", "1"]
    assert main([*args, "--float8", "tensorwise"]) == 2
    assert "nothing would convert" in capsys.readouterr().err
    assert main([*args, "--float8", "auto"]) == 0
    assert "FP8: float8 off: no block linear reaches" in capsys.readouterr().out
