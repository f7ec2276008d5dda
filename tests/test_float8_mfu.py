"""MFU of a float8 run: `mfu` against the bf16 peak (comparable with bf16 runs) and
`mfu_float8` against the peak its own mix of FP8 and bf16 GEMMs allows. No GPU here: the card is
named, its peaks come from hardware.toml."""

from __future__ import annotations

import pytest
import torch

from triaxis.config import load_config
from triaxis.hardware import peak_bf16_flops, peak_fp8_flops
from triaxis.metrics.logger import mixed_peak_flops
from triaxis.model import build_model_args
from triaxis.model.args import flops_per_token
from triaxis.parallel.float8 import converted_flops_per_token
from triaxis.train.record import float8_peak

H100 = "NVIDIA H100 80GB HBM3"


def test_the_mixed_peak_runs_between_bf16_and_fp8():
    bf16, fp8 = 1e15, 2e15
    assert mixed_peak_flops(bf16, fp8, 100.0, 0.0) == pytest.approx(bf16)
    assert mixed_peak_flops(bf16, fp8, 100.0, 100.0) == pytest.approx(fp8)
    # Half the FLOPs at twice the rate: 0.75 of the time, so 4/3 of the bf16 peak.
    assert mixed_peak_flops(bf16, fp8, 100.0, 50.0) == pytest.approx(bf16 * 4 / 3)


def test_the_fp8_peaks_come_from_the_hardware_table():
    assert peak_fp8_flops(H100) == pytest.approx(2 * peak_bf16_flops(H100), rel=1e-3)
    assert peak_fp8_flops("NVIDIA H200") == peak_fp8_flops(H100)
    assert peak_fp8_flops("NVIDIA A100-SXM4-80GB") is None  # no FP8 units
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)


def test_a_float8_8b_run_on_h100_is_measured_against_its_gemm_mix():
    cfg = load_config(None, ["--model.preset", "8b", "--train.float8", "tensorwise"])
    a = build_model_args(cfg.model)
    # Every block projection of 8b passes the size filter: 6 x (q, k, v, o, w1, w2, w3) per layer.
    hd, kv = a.dim // a.n_heads, a.n_kv_heads * (a.dim // a.n_heads)
    per_layer = a.dim * a.n_heads * hd * 2 + a.dim * kv * 2 + 3 * a.dim * a.ffn_dim
    assert converted_flops_per_token(a, cfg.train.float8_min_dim) == 6 * a.n_layers * per_layer
    fpt = flops_per_token(a, 4096)
    peak = float8_peak(cfg.train, a, torch.device("cpu"), fpt, name=H100)
    share = 6 * a.n_layers * per_layer / fpt
    bf16 = peak_bf16_flops(H100)
    assert peak == pytest.approx(bf16 / (share / 2 + (1 - share)), rel=1e-3)
    assert bf16 < peak < 2 * bf16


def test_no_float8_mfu_where_it_means_nothing():
    on = load_config(None, ["--model.preset", "tiny", "--train.float8", "tensorwise"])
    off = load_config(None, ["--model.preset", "tiny"])
    a = build_model_args(on.model)
    cpu = torch.device("cpu")
    assert float8_peak(off.train, a, cpu, 1.0, name=H100) is None  # float8 off
    assert float8_peak(on.train, a, cpu, 1.0) is None  # no GPU
    assert float8_peak(on.train, a, cpu, 1.0, name="NVIDIA A100-SXM4-80GB") is None
