"""Qwen3 and Qwen3-MoE <-> triaxis: per-head q/k norms, a head size apart from dim / n_heads,
dense first blocks and both top-k normalizations, against transformers' logits, in and out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests import helpers
from tests.hf_helpers import SHAPE, TOKENS, load_triaxis, logits_of, randomized
from triaxis.cli import main

# head_dim 32 with hidden 64 and 4 heads: Qwen3-30B-A3B's kind of shape (128 at 2048 / 32).
QWEN3 = dict(SHAPE, head_dim=32, use_sliding_window=False, tie_word_embeddings=False)
QWEN3_MOE = dict(
    QWEN3, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
    mlp_only_layers=[0], decoder_sparse_step=1,
)  # fmt: skip


def qwen3_moe_reference(norm_topk: bool):
    config = transformers.Qwen3MoeConfig(**QWEN3_MOE, norm_topk_prob=norm_topk)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    return randomized(model, lambda name: 0.3 if "embed" in name else 0.1)


def qwen3_reference():
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3))
    return randomized(model, lambda name: 0.3 if "embed" in name else 0.1)


def _imported(root: Path, ref) -> dict:
    ref.save_pretrained(root / "hf")
    assert main(["import-hf", str(root / "hf"), "--output", str(root / "ckpt")]) == 0
    return {"hf": root / "hf", "ckpt": str(root / "ckpt"), "logits": logits_of(ref)}


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "raw_topk"])
def qwen3_moe(request, tmp_path_factory):
    return _imported(tmp_path_factory.mktemp("qwen3moe"), qwen3_moe_reference(request.param))


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _round_trip(imported: dict, out: Path, cls, extra=()) -> None:
    """export-hf loads in transformers as `cls` with the same logits, and every tensor is the
    original under the Hub's name, bit for bit."""
    assert main(["export-hf", imported["ckpt"], str(out), *extra]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert isinstance(back, cls)
    torch.testing.assert_close(logits_of(back), imported["logits"], rtol=1e-5, atol=1e-5)
    orig, new = _tensors(imported["hf"]), _tensors(out)
    assert sorted(orig) == sorted(new)
    for name, t in orig.items():
        assert torch.equal(t, new[name]), name


def test_qwen3_moe_import_matches_transformers(qwen3_moe):
    model = load_triaxis(qwen3_moe["ckpt"])
    a = model.args
    assert (a.n_experts, a.moe_top_k, a.moe_first_dense, a.head_dim, a.qk_norm) == (
        4,
        2,
        1,
        32,
        True,
    )
    got = logits_of(model)
    print(f"\nimport qwen3_moe: max |logits diff| = {(got - qwen3_moe['logits']).abs().max():.2e}")
    torch.testing.assert_close(got, qwen3_moe["logits"], rtol=1e-5, atol=1e-5)
    # The routing is not degenerate: every expert is chosen somewhere.
    with torch.no_grad():
        h = model.tok_embeddings(TOKENS).reshape(-1, SHAPE["hidden_size"])
        _, chosen, _ = model.layers["1"].feed_forward.router(h)
    assert len(set(chosen.flatten().tolist())) == 4


@pytest.mark.parametrize("shard", [None, "0.0001"])
def test_qwen3_moe_export_loads_in_transformers(qwen3_moe, tmp_path, shard):
    extra = ["--max-shard-gb", shard] if shard else []
    _round_trip(qwen3_moe, tmp_path / "out", transformers.Qwen3MoeForCausalLM, extra)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["mlp_only_layers"] == [0]
    assert config["head_dim"] == 32


def test_dense_qwen3_round_trip(tmp_path):
    imported = _imported(tmp_path, qwen3_reference())
    got = logits_of(load_triaxis(imported["ckpt"]))
    torch.testing.assert_close(got, imported["logits"], rtol=1e-5, atol=1e-5)
    _round_trip(imported, tmp_path / "out", transformers.Qwen3ForCausalLM)


def test_qwen3_overrides_rebuild_the_shape(qwen3_moe):
    from triaxis.hf.convert import args_from_hf_config, model_overrides

    config = json.loads((qwen3_moe["hf"] / "config.json").read_text())
    flags = model_overrides(args_from_hf_config(config, has_lm_head=True))
    for flag in ("--model.head_dim=32", "--model.qk_norm=true", "--model.moe_first_dense=1"):
        assert flag in flags


REFUSED = {
    "sparse_step": ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    "dense_later": ({"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
    "sliding": ({"use_sliding_window": True}, "use_sliding_window=true"),
    "top_k": ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 exceeds"),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_unsupported_qwen3_moe_config_is_refused(what, qwen3_moe, tmp_path, capsys):
    edit, expect = REFUSED[what]
    shutil.copytree(qwen3_moe["hf"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
    assert main(["import-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "o")]) == 2
    assert expect in helpers.one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
