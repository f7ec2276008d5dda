"""Causal attention, optionally restricted to documents inside a packed window.

A packed window holds several documents back to back, each ended by the tokenizer's
end-of-document (EOS) token. With document masking a query attends only to keys of its own
document, and RoPE positions restart at 0 at every document start, so each document is computed
exactly as if it were run alone. The EOS token belongs to the document it ends: the token after
it starts a new document (and the first document of a window starts at position 0 too, even
when it continues a document of the previous window).

Two implementations of one mask, picked by device (`attention_backend`):
  sdpa -- scaled_dot_product_attention with a dense boolean (B, 1, T, T) block-diagonal causal
          mask: CPU (FlexAttention has no CPU backward in torch 2.13) and any non-CUDA device;
  flex -- FlexAttention with a BlockMask built from a document mask_mod: CUDA, where it skips
          the fully masked blocks instead of computing them.
Both compute the same function; the model code calls `attend` and never sees which one ran.

Grouped-query attention (fewer K/V heads than query heads) goes to SDPA as is (`enable_gqa`)
wherever a fused kernel takes it: on CUDA that is only the flash kernel, which needs fp16/bf16
and no explicit mask. Anything else on CUDA (fp32: `--train.dtype=fp32`, the fp32 benchmarks)
would fall back to the MATH kernel, which materializes the B x H x T x T scores (8.6 GB a layer
at the 1b shape, seq 4096), so K/V are first repeated to every query head
(`repeat_kv_for_sdpa`): n_heads / n_kv_heads times K/V's own O(T) size, and the memory-
efficient kernel runs. The bf16 training path keeps flash with GQA.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

Backend = str  # "sdpa" or "flex"


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) input tokens -> (B, T) int32 document index within each row: the number of EOS
    tokens strictly before each position (the EOS itself closes its own document)."""
    eos = (tokens == eos_id).to(torch.int32)
    return (eos.cumsum(dim=1, dtype=torch.int32) - eos).contiguous()


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) int64 position of each token inside its document."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # The index of the latest document start at or before each position.
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def attention_backend(device: torch.device | str) -> Backend:
    """Which implementation a masked forward on `device` uses: flex on CUDA, else sdpa."""
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


def document_mask(doc_ids: torch.Tensor, backend: Backend | None = None):
    """The attention mask of documents `doc_ids` (B, T), built once per forward and shared by
    every layer: a (B, 1, T, T) bool tensor (sdpa, True = attend) or a BlockMask (flex)."""
    backend = backend or attention_backend(doc_ids.device)
    B, T = doc_ids.shape
    if backend == "sdpa":
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        return (same_doc & causal)[:, None]  # (B, 1, T, T), broadcast over heads
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    # Eager create_block_mask materializes the whole (B, T, T) mask first; compiled, it builds
    # the block mask directly (as torchtitan does). Compiling costs seconds: on CUDA only.
    make = _compiled(create_block_mask) if doc_ids.is_cuda else create_block_mask
    return make(mask_mod, B, None, T, T, device=doc_ids.device)


def repeat_kv_for_sdpa(device_type: str, dtype: torch.dtype, gqa: bool, masked: bool) -> bool:
    """Whether SDPA gets K/V repeated to every query head rather than `enable_gqa`: on CUDA
    when the flash kernel, the only fused one with GQA, cannot run (fp32, or an explicit mask).
    On CPU the fused kernel takes GQA in every dtype."""
    flash = dtype in (torch.float16, torch.bfloat16) and not masked
    return gqa and device_type == "cuda" and not flash


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, gqa: bool = False
) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hd) over k, v (B, nkv, T, hd); `mask` from
    `document_mask` (None = plain causal over the whole window), or a context-parallel mask
    (triaxis.parallel.context), which attends across the cp ranks itself. Returns (B, nh, T, hd)."""
    if hasattr(mask, "attend"):
        return mask.attend(q, k, v)
    dense = mask is None or isinstance(mask, torch.Tensor)
    if dense and repeat_kv_for_sdpa(q.device.type, q.dtype, gqa, mask is not None):
        repeat = q.shape[1] // k.shape[1]  # query head i reads K/V head i // repeat, as GQA
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        gqa = False
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled: a fused kernel; eager FlexAttention materializes the scores.
    return _compiled(flex_attention)(q, k, v, block_mask=mask, enable_gqa=gqa)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)
