"""import-hf of checkpoints whose config and lm_head disagree: every combination of
tie_word_embeddings and a stored lm_head either imports as the model transformers loads (same
logits) or is refused in one line, with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from tests import helpers
from tests.hf_helpers import load_triaxis, logits_of
from tests.test_hf import hf_reference
from triaxis.cli import main

# (config's tie_word_embeddings, stored lm_head: none / equal to the embedding / different)
CASES = {
    "tied_no_head": (True, "none", None),
    "tied_equal_head": (True, "equal", None),
    "tied_different_head": (True, "different", "differs from model.embed_tokens.weight"),
    "untied_no_head": (False, "none", "has no lm_head.weight"),
    "untied_head": (False, "different", None),
}


def write_folder(root, tied: bool, head: str):
    """A tiny random Llama saved, then its config / lm_head rewritten to the case."""
    from safetensors.torch import load_file, save_file

    ref = hf_reference(False)
    ref.save_pretrained(root)
    tensors = load_file(root / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"]
    if head == "none":
        del tensors["lm_head.weight"]
    elif head == "equal":
        tensors["lm_head.weight"] = emb.clone()
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tied}))


@pytest.mark.parametrize("case", list(CASES))
def test_tie_combinations_match_transformers_or_refuse(case, tmp_path, capsys):
    import transformers

    tied, head, refusal = CASES[case]
    write_folder(tmp_path / "hf", tied, head)
    capsys.readouterr()  # transformers' progress bars
    out = tmp_path / "ckpt"
    code = main(["import-hf", str(tmp_path / "hf"), "--output", str(out)])
    if refusal:
        assert code == 2
        assert refusal in helpers.one_error_line(capsys.readouterr().err)
        assert not out.exists() or not any(out.iterdir())
        return
    assert code == 0
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    meta = json.loads((out / "triaxis.json").read_text())
    assert meta["model"]["tie_embeddings"] is tied
    torch.testing.assert_close(logits_of(load_triaxis(str(out))), logits_of(ref))
