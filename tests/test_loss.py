"""The fused, chunked LM head + cross-entropy (triaxis.model.loss) against the plain head and
F.cross_entropy: same loss, same gradients, never the logits of the whole batch."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from triaxis.model import PRESETS, Transformer
from triaxis.model.loss import chunked_cross_entropy


class LargestLogits(TorchDispatchMode):
    """Records the most elements of any tensor an op produced whose last dimension is the
    vocabulary (logits, their fp32 copies, softmax, their gradients)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.numel = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.numel = max(self.numel, t.numel())
        return out


def tiny_model(tied: bool) -> Transformer:
    args = dataclasses.replace(PRESETS["tiny"], vocab_size=1000, tie_embeddings=tied)
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize("cpu")
    model.init_weights(seed=3)
    return model


def grads_after(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [7, 64, 4096], ids=["ragged", "exact", "one_chunk"])
def test_model_loss_and_grads_match_plain_head(tied, chunk):
    model = tiny_model(tied)
    tokens = torch.randint(0, 1000, (4, 33), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    plain = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    want = grads_after(model, plain)
    fused = model(inputs, targets=targets, loss_chunk=chunk)
    got = grads_after(model, fused * 0.5)  # a scaled loss (gradient accumulation) scales both
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for name, g in want.items():
        torch.testing.assert_close(got[name], 0.5 * g, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # validation: no gradient buffers, same value
        torch.testing.assert_close(model(inputs, targets=targets, loss_chunk=chunk), plain)


def test_never_materializes_the_batch_logits():
    model = tiny_model(tied=True)
    tokens = torch.randint(0, 1000, (8, 65), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    sizes = {}
    for name, chunk in (("plain", 0), ("fused", 128)):
        with LargestLogits(1000) as mode:
            out = (
                model(inputs, targets=targets, loss_chunk=chunk)
                if chunk
                else F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            )
            out.backward()
        sizes[name] = mode.numel
    assert sizes["plain"] == 8 * 64 * 1000  # the logits of all 512 tokens
    assert sizes["fused"] == 128 * 1000  # one chunk's (the head itself: 64 x 1000)


def test_bf16_autocast_follows_the_plain_numerics():
    """Under autocast the products run in bf16 and the softmax in fp32, as the plain path does."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(96, 64, generator=gen, requires_grad=True)
    w = (torch.randn(500, 64, generator=gen) * 0.1).requires_grad_()
    t = torch.randint(0, 500, (96,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy((h @ w.T).float(), t)
        fused = chunked_cross_entropy(h, w, t, 40)
    gh, gw = torch.autograd.grad(plain, (h, w))
    fh, fw = torch.autograd.grad(fused, (h, w))
    assert fh.dtype == h.dtype and fw.dtype == w.dtype
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fh, gh, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(fw, gw, rtol=2e-2, atol=2e-4)


def test_bf16_weights_and_ignored_targets_follow_the_plain_numerics():
    """FSDP mixed precision's path: h and the head in bf16, no autocast; the products write
    straight into the bf16 gradients. Ignored targets get no loss and no gradient."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(96, 64, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(500, 64, generator=gen) * 0.1).bfloat16().requires_grad_()
    t = torch.randint(0, 500, (96,), generator=gen)
    t[::5] = -100
    plain = F.cross_entropy((h @ w.T).float(), t)
    fused = chunked_cross_entropy(h, w, t, 40)
    gh, gw = torch.autograd.grad(plain, (h, w))
    fh, fw = torch.autograd.grad(fused * 2, (h, w))
    assert fh.dtype == fw.dtype == torch.bfloat16
    assert fh[::5].eq(0).all()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fh, 2 * gh, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(fw, 2 * gw, rtol=2e-2, atol=2e-4)
