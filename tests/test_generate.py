"""KV-cache generation (triaxis/generate.py): greedy output equals transformers' greedy
`generate` on the weights `export-hf` writes, token for token, and the cached path equals the
uncached one also past max_seq_len, where both slide the window."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.test_hf import hf_reference
from triaxis.checkpoint.inference import load_checkpoint_model
from triaxis.cli import main
from triaxis.generate import KVCache, cached_forward, generate
from triaxis.model.llama import model_rope_tables

PROMPT = [5, 17, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small random Llama (grouped-query attention) imported into a triaxis checkpoint, and
    that checkpoint exported back and loaded by transformers."""
    root = tmp_path_factory.mktemp("generate")
    hf_reference(False).save_pretrained(root / "src")
    assert main(["import-hf", str(root / "src"), "--output", str(root / "ckpt")]) == 0
    assert main(["export-hf", str(root / "ckpt"), str(root / "out")]) == 0
    model, _ = load_checkpoint_model(str(root / "ckpt"))
    model.rope.copy_(model_rope_tables(model.args))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(root / "out")).eval()
    return model.eval(), hf


def test_greedy_with_kv_cache_equals_transformers_generate(exported):
    model, hf = exported
    new = 48
    got = generate(model, PROMPT, new, temperature=0)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert got == out[0, len(PROMPT) :].tolist()
    assert got == generate(model, PROMPT, new, temperature=0, use_cache=False)
    assert len(set(got)) > 5  # not one token repeated: the comparison can fail


def test_cached_logits_equal_the_full_forward(exported):
    model, _ = exported
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model)
        first = cached_forward(model, tokens[:, :30], cache)
        rest = [cached_forward(model, tokens[:, t : t + 1], cache) for t in range(30, 40)]
    torch.testing.assert_close(first, full[:, 29], rtol=1e-5, atol=1e-5)
    for t, logits in zip(range(30, 40), rest):
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_past_max_seq_len_the_cached_path_slides_like_the_uncached_one(exported):
    model, _ = exported
    prompt = torch.randint(0, 300, (110,), generator=torch.Generator().manual_seed(4)).tolist()
    window = model.args.max_seq_len
    assert len(prompt) < window < len(prompt) + 40
    assert generate(model, prompt, 40, temperature=0) == generate(
        model, prompt, 40, temperature=0, use_cache=False
    )
