import dataclasses

import pytest
import torch

from triaxis.model import PRESETS, Transformer, flops_per_token, param_counts
from triaxis.model.llama import apply_rope, rope_tables


def build(**changes) -> Transformer:
    args = dataclasses.replace(PRESETS["tiny"], **changes)
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize("cpu")
    model.init_weights(seed=0)
    return model


def test_forward_shape_and_param_count():
    for tied in (False, True):
        model = build(tie_embeddings=tied)
        logits = model(torch.randint(0, model.args.vocab_size, (2, 16)))
        assert logits.shape == (2, 16, model.args.vocab_size)
        n = sum(p.numel() for p in model.parameters())  # a tied weight counts once
        assert n == param_counts(model.args)["total"]


def test_presets_match_published_llama_sizes():
    # Llama 3.x parameter counts as published: 1.24B (3.2-1B), 8.03B, 70.6B, 405.9B.
    expected = {"1b": 1.236e9, "8b": 8.03e9, "70b": 70.55e9, "405b": 405.85e9}
    for name, n in expected.items():
        assert abs(param_counts(PRESETS[name])["total"] / n - 1) < 0.002, name
    small = param_counts(PRESETS["small"])["total"]
    assert 10e6 <= small <= 30e6


def test_flops_per_token_formula():
    a = PRESETS["1b"]
    n = param_counts(a)["non_embedding"] + a.vocab_size * a.dim
    assert flops_per_token(a, 2048) == 6 * n + 12 * a.n_layers * a.dim * 2048


def test_init_is_deterministic_and_layout_free():
    a, b = build(), build()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    c = build()
    c.init_weights(seed=1)
    assert not torch.equal(a.layers["0"].attention.wq.weight, c.layers["0"].attention.wq.weight)


def test_causal_masking():
    model = build()
    x = torch.randint(0, model.args.vocab_size, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % model.args.vocab_size  # change only the future
    with torch.no_grad():
        la, lb = model(x), model(y)
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert not torch.allclose(la[:, 8:], lb[:, 8:])


def test_rope_preserves_norm_and_encodes_relative_position():
    table = rope_tables(head_dim=16, seq_len=64, theta=10000.0)
    q = torch.randn(1, 1, 1, 16).expand(1, 64, 1, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 64, 1, 16)
    rq, rk = apply_rope(q, table), apply_rope(k, table)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    dots = rq[0, :, 0] @ rk[0, :, 0].T  # (64, 64): depends on m - n only
    torch.testing.assert_close(dots[10, 7], dots[40, 37], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dots[5, 5], dots[50, 50], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dots[10, 7], dots[10, 2])


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with n_kv_heads=2 equals full attention whose K/V heads are the repeated KV heads."""
    gqa = build(n_kv_heads=2)
    mha = build(n_kv_heads=4)
    hd, rep = gqa.args.head_dim, gqa.args.n_heads // gqa.args.n_kv_heads
    with torch.no_grad():
        for name, layer in gqa.layers.items():
            target = mha.layers[name]
            for p_name, p in layer.named_parameters():
                if p_name in ("attention.wk.weight", "attention.wv.weight"):
                    p = p.view(-1, hd, p.shape[-1]).repeat_interleave(rep, 0).flatten(0, 1)
                target.get_parameter(p_name).copy_(p)
        for p_name in ("tok_embeddings.weight", "norm.weight", "output.weight"):
            mha.get_parameter(p_name).copy_(gqa.get_parameter(p_name))
    x = torch.randint(0, gqa.args.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = Transformer(PRESETS["70b"])
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(70.55e9, rel=0.002)


def test_sdpa_repeats_kv_only_where_cuda_has_no_fused_gqa_kernel():
    """On CUDA only flash takes GQA, and flash needs fp16/bf16 without an explicit mask: any
    other case would fall back to MATH (B x H x T x T scores), so K/V are repeated instead."""
    from triaxis.model.attention import repeat_kv_for_sdpa as repeat

    assert not repeat("cuda", torch.bfloat16, True, False)  # the training path: flash
    assert not repeat("cuda", torch.float16, True, False)
    assert repeat("cuda", torch.float32, True, False)  # --train.dtype=fp32, fp32 benchmarks
    assert repeat("cuda", torch.bfloat16, True, True)  # a dense mask: no flash
    assert not repeat("cuda", torch.float32, False, False)  # no GQA: nothing to repeat
    assert not repeat("cpu", torch.float32, True, True)  # the CPU fused kernel takes GQA


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document_mask"])
def test_repeated_kv_attention_equals_gqa(monkeypatch, masked):
    from triaxis.model import attention

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 12, 8, generator=gen)
    k, v = torch.randn(2, 2, 2, 12, 8, generator=gen)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    mask = attention.document_mask(doc_ids, "sdpa") if masked else None
    want = attention.attend(q, k, v, mask, gqa=True)
    monkeypatch.setattr(attention, "repeat_kv_for_sdpa", lambda *_: True)
    torch.testing.assert_close(attention.attend(q, k, v, mask, gqa=True), want)


def test_bf16_autocast_reaches_sdpa_in_bf16_with_gqa():
    """The bf16 path's q, k, v arrive at the attention kernel in bf16 (what flash needs on a GPU),
    K/V with their own head count (GQA, not repeated)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                seen.append([(a.dtype, a.shape[1]) for a in args[:3]])
            return func(*args, **(kwargs or {}))

    model = build(n_kv_heads=2)
    x = torch.randint(0, model.args.vocab_size, (2, 10))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Record():
        model(x)
    assert len(seen) == model.args.n_layers
    assert all(s == [(torch.bfloat16, 4), (torch.bfloat16, 2), (torch.bfloat16, 2)] for s in seen)
