"""Sampling from a trained checkpoint (one process, no parallelism needed). The checkpoint is
loaded by triaxis.checkpoint.inference.load_for_inference."""

from __future__ import annotations

import torch

from triaxis.errors import UserError
from triaxis.model import Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    if temperature < 0:
        raise UserError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids or [eos_id or 0]], device=device)
    window = model.args.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -window:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and int(nxt) == eos_id:
            break
    return ids[0, len(prompt_ids) :].tolist()
