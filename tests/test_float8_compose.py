"""FP8 (train.float8) composed with pipeline parallel, selective checkpointing, document
masking, LoRA and MoE: each trains like the one-process float8 run it composes with.

Measured on CPU (torch 2.13, torchao 0.18), tiny, 8 steps of 8 x 32 tokens at lr 3e-3, fp32
compute, max relative loss gap over the steps:
  pp=2 1f1b (micro-batch 2) vs world 1 accumulating micro-batches of 2      2.3e-5
  selective checkpointing vs none                                           0
  document mask: float8 vs off                                              7.3e-4
  LoRA (wq, w2 adapted; frozen base converted): float8 vs off               7.5e-5
  tiny-moe (attention + shared experts converted): float8 vs off            7.9e-4
Tolerances: ten times the pipeline's gap (still under float8-vs-off's 5.5e-4, so a stage
that skipped the conversion fails), twice the float8-vs-off gaps.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("torchao", reason="the float8 extra is part of the test extra")

from tests.test_document_mask import short_docs  # noqa: E402, F401  (the fixture)
from tests.test_float8 import _max_rel, _run  # noqa: E402
from triaxis.model import Transformer  # noqa: E402
from triaxis.model.presets import PRESETS  # noqa: E402
from triaxis.parallel.float8 import float8_targets  # noqa: E402

PP_REL, DOC_REL, LORA_REL, MOE_REL = 10 * 2.3e-5, 2 * 7.3e-4, 2 * 7.5e-5, 2 * 7.9e-4


def test_float8_pp_1f1b_matches_one_process_with_the_same_micro_batches(byte_data, tmp_path):
    """Dynamic scales are per GEMM call, so a pipeline's micro-batches of 2 scale like one
    process accumulating micro-batches of 2: the same numerics, to rounding."""
    f8 = {"train__float8": "tensorwise", "train__micro_batch": 2}
    one = _run(byte_data, str(tmp_path / "a"), 1, **f8)
    off = _run(byte_data, str(tmp_path / "c"), 1, **{**f8, "train__float8": "off"})
    pp = _run(
        byte_data, str(tmp_path / "b"), 2, **f8,
        parallel__pp=2, parallel__pp_schedule="1f1b", parallel__dp_shard=1,
    )  # fmt: skip
    assert _max_rel(pp, one) < PP_REL < _max_rel(off, one)


@pytest.mark.slow
def test_float8_selective_checkpointing_matches(byte_data, tmp_path):
    """Recompute takes the same dynamic scales from the same tensors: identical losses."""
    base = _run(byte_data, str(tmp_path / "a"), 1, train__float8="tensorwise")
    got = _run(
        byte_data, str(tmp_path / "b"), 1, train__float8="tensorwise",
        parallel__activation_checkpoint="selective",
    )  # fmt: skip
    assert _max_rel(got, base) < 1e-6


@pytest.mark.slow
def test_float8_with_document_mask(short_docs, tmp_path):  # noqa: F811
    mask = {"data__document_mask": "true"}
    off = _run(short_docs, str(tmp_path / "a"), 1, train__float8="off", **mask)
    f8 = _run(short_docs, str(tmp_path / "b"), 1, train__float8="tensorwise", **mask)
    unmasked = _run(short_docs, str(tmp_path / "c"), 1, train__float8="tensorwise")
    assert 0 < _max_rel(f8, off) < DOC_REL
    assert _max_rel(f8, unmasked) > DOC_REL  # the mask is in effect under float8


@pytest.mark.slow
def test_float8_converts_the_frozen_lora_base(byte_data, tmp_path):
    """The conversion runs before the adapters are added: the frozen base linears are
    Float8Linear (their GEMMs run in float8), the adapters stay high precision."""
    lora = {"lora__enabled": "true", "lora__targets": "attention.wq,feed_forward.w2"}
    off = _run(byte_data, str(tmp_path / "a"), 1, train__float8="off", **lora)
    f8 = _run(byte_data, str(tmp_path / "b"), 1, train__float8="tensorwise", **lora)
    assert 0 < _max_rel(f8, off) < LORA_REL


def _moe(n_experts: int) -> Transformer:
    with torch.device("meta"):
        return Transformer(dataclasses.replace(PRESETS["tiny-moe"], n_experts=n_experts))


def test_float8_moe_converts_attention_and_shared_experts_never_the_router():
    """16 experts make the router 64 -> 16, over the size filter: it must still stay out."""
    names = float8_targets(_moe(16), 16)
    assert not [n for n in names if "router" in n or ".experts" in n]
    assert "layers.1.attention.wq" in names and "layers.1.feed_forward.shared.w2" in names


@pytest.mark.slow
def test_float8_moe_tracks_off(byte_data, tmp_path):
    moe = {"model__preset": "tiny-moe"}
    off = _run(byte_data, str(tmp_path / "a"), 1, train__float8="off", **moe)
    f8 = _run(byte_data, str(tmp_path / "b"), 1, train__float8="tensorwise", **moe)
    assert 0 < _max_rel(f8, off) < MOE_REL
