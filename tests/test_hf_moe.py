"""Mixtral <-> triaxis MoE: import and export against transformers' logits; Qwen2-MoE refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from tests import helpers
from tests.hf_helpers import SHAPE, TOKENS, load_triaxis, logits_of, randomized
from triaxis.cli import main
from triaxis.hf.convert import args_from_hf_config, model_overrides

MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def mixtral_reference():
    """A tiny random Mixtral whose routing is far from uniform (weights of std 0.1-0.3), so a
    wrong expert order, transpose or top-k normalization shows in the logits."""
    config = transformers.MixtralConfig(**SHAPE, **MIXTRAL, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    return randomized(model, lambda name: 0.3 if "embed" in name else 0.1)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    ref = mixtral_reference()
    ref.save_pretrained(root / "hf")
    assert main(["import-hf", str(root / "hf"), "--output", str(root / "ckpt")]) == 0
    return {"root": root, "hf": root / "hf", "ckpt": str(root / "ckpt"), "logits": logits_of(ref)}


def test_mixtral_import_matches_transformers(mixtral):
    model = load_triaxis(mixtral["ckpt"])
    assert model.args.n_experts == 4 and model.args.moe_top_k == 2 and model.args.moe_norm_topk
    got = logits_of(model)
    print(f"\nimport mixtral: max |logits diff| = {(got - mixtral['logits']).abs().max():.2e}")
    torch.testing.assert_close(got, mixtral["logits"], rtol=1e-5, atol=1e-5)
    # The routing is not degenerate: the two chosen experts differ across tokens.
    with torch.no_grad():
        h = model.tok_embeddings(TOKENS).reshape(-1, SHAPE["hidden_size"])
        _, chosen, _ = model.layers["0"].feed_forward.router(h)
    assert len(set(chosen.flatten().tolist())) == 4


@pytest.mark.parametrize("shard", [None, "0.0001"])
def test_mixtral_export_loads_in_transformers(mixtral, tmp_path, shard):
    extra = ["--max-shard-gb", shard] if shard else []
    assert main(["export-hf", mixtral["ckpt"], str(tmp_path / "out"), *extra]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert isinstance(back, transformers.MixtralForCausalLM)
    got = logits_of(back)
    torch.testing.assert_close(got, mixtral["logits"], rtol=1e-5, atol=1e-5)
    # The per-expert tensors are the originals, bit for bit, under the Hub's names.
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    orig, new = tensors(mixtral["hf"]), tensors(tmp_path / "out")
    assert sorted(orig) == sorted(new)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in new
    for name, t in orig.items():
        assert torch.equal(t, new[name]), name


def test_mixtral_overrides_rebuild_the_shape(mixtral):
    config = json.loads((mixtral["hf"] / "config.json").read_text())
    args = args_from_hf_config(config, has_lm_head=True)
    assert "--model.n_experts=4" in model_overrides(args)
    assert "--model.moe_top_k=2" in model_overrides(args)


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return helpers.one_error_line(capsys.readouterr().err)


REFUSED = {
    "qwen2_moe": ({"model_type": "qwen2_moe"}, "shared_expert_gate"),
    "jitter": ({"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    "sliding": ({"sliding_window": 16}, "sliding_window=16"),
    "top_k": ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 exceeds"),
    "fewer_experts": ({"num_local_experts": 3}, "does not account for"),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_unsupported_moe_config_is_refused(what, mixtral, tmp_path, capsys):
    edit, expect = REFUSED[what]
    shutil.copytree(mixtral["hf"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
    err = _error(["import-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "o")], capsys)
    assert expect in err
    assert not (tmp_path / "o").exists()
