"""Sampling from a trained checkpoint (one process, no parallelism needed). The checkpoint is
loaded by triaxis.checkpoint.inference.load_for_inference.

Decoding uses a KV cache: the prompt is run once (prefill), then each new token runs alone
against the keys and values of every earlier token, kept per layer in `KVCache`. That is an
inference path of its own here (`cached_forward`), built from the model's own modules and
weights: the training forward stays as it is, with no cache argument to trace or compile.
Past max_seq_len tokens (where the RoPE table ends) each token recomputes the last
max_seq_len-token window without a cache, as the uncached path always does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triaxis.errors import UserError
from triaxis.model import Transformer
from triaxis.model.llama import apply_rope


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (B, n_kv_heads, max_seq_len,
    head_dim) each, filled up to `length`."""

    def __init__(self, model: Transformer, batch: int = 1):
        a = model.args
        p = next(model.parameters())
        shape = (batch, a.n_kv_heads, a.max_seq_len, a.head_dim)
        self.k = {n: torch.zeros(shape, dtype=p.dtype, device=p.device) for n in model.layers}
        self.v = {n: torch.zeros(shape, dtype=p.dtype, device=p.device) for n in model.layers}
        self.length = 0

    def room(self) -> int:
        return next(iter(self.k.values())).shape[2] - self.length


def _cached_attention(attn, x: torch.Tensor, rope: torch.Tensor, k_all, v_all, start: int):
    """The model's Attention on tokens at positions start .. start+T-1, their keys and values
    written into the cache at those positions."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, -1, attn.head_dim)  # (B, T, nh, hd)
    k = attn.wk(x).view(B, T, -1, attn.head_dim)  # (B, T, nkv, hd)
    v = attn.wv(x).view(B, T, -1, attn.head_dim)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    k_all[:, :, start : start + T] = k.transpose(1, 2)
    v_all[:, :, start : start + T] = v.transpose(1, 2)
    keys, values = k_all[:, :, : start + T], v_all[:, :, : start + T]
    if attn.kv_repeat > 1:  # query head i reads K/V head i // repeat
        keys = keys.repeat_interleave(attn.kv_repeat, dim=1)
        values = values.repeat_interleave(attn.kv_repeat, dim=1)
    # Only a prefill from position 0 (T == start + T) or one token at a time occur: causal for
    # the first, every cached key for the second.
    assert start == 0 or T == 1, "the cache is filled by one prefill, then a token at a time"
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=T > 1)
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1))


def cached_forward(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens (B, T) following the cache's `length` tokens -> logits of the last one (B, vocab);
    the same numbers as the model's forward on the whole sequence, in O(T + length) work."""
    start, T = cache.length, tokens.shape[1]
    rope = model.rope[start : start + T][None]  # (1, T, hd/2, 2): positions start ..
    h = model.tok_embeddings(tokens)
    for name, layer in model.layers.items():
        h = h + _cached_attention(
            layer.attention, layer.attention_norm(h), rope, cache.k[name], cache.v[name], start
        )
        h = h + layer.feed_forward(layer.ffn_norm(h))
    cache.length += T
    return model.output(model.norm(h[:, -1:]))[:, -1]


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """New token ids after `prompt_ids`: greedy with temperature 0, else sampled (top_k).
    use_cache=False recomputes the whole window for every token (for comparison)."""
    if temperature < 0:
        raise UserError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids or [eos_id or 0]], device=device)
    window = model.args.max_seq_len
    cache = KVCache(model) if use_cache and ids.shape[1] < window else None
    fresh = ids  # the tokens the cache has not seen yet
    for _ in range(max_new_tokens):
        if cache is not None and cache.room() >= fresh.shape[1]:
            logits = cached_forward(model, fresh, cache).float()
        else:
            logits = model(ids[:, -window:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        ids, fresh = torch.cat([ids, nxt], dim=1), nxt
        if eos_id is not None and int(nxt) == eos_id:
            break
    return ids[0, len(prompt_ids) :].tolist()
