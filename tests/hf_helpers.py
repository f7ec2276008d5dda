"""What the Hugging Face tests share: the token batch, a transformers model with weights far
from its own init, logits of either model, a triaxis checkpoint loaded for inference."""

from __future__ import annotations

import torch

from tests.helpers import TINY_LLAMA

SHAPE = dict(TINY_LLAMA, vocab_size=300, rope_theta=10000.0)
TOKENS = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))


def randomized(model, std_of):
    """`model` (eval mode) with every norm weight in [0.5, 1.5) and every other weight normal
    with std `std_of(name)`. transformers' init (std 0.02, unit norms) makes attention nearly
    uniform and routing nearly even: a wrong RoPE row order, expert order or transpose would
    hide under 1e-5."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std_of(name))
    return model.eval()


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return (out.logits if hasattr(out, "logits") else out).float()


def load_triaxis(ckpt: str):
    from triaxis.checkpoint.inference import load_checkpoint_model
    from triaxis.model.llama import model_rope_tables

    model, _ = load_checkpoint_model(ckpt)
    model.rope.copy_(model_rope_tables(model.args))
    return model.eval()
