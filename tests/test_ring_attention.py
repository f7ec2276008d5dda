"""Ring attention (context parallelism) against dense SDPA over the whole sequence.

Rows hold several documents of ragged lengths that cross the head-tail chunk boundaries; the
reference is scaled_dot_product_attention with the dense block-diagonal causal mask of
triaxis.model.attention. Forward and backward (dq, dk, dv) must agree to 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist import run_workers
from triaxis.model.attention import document_ids, document_mask
from triaxis.parallel import cp_kernel
from triaxis.parallel.cp_shard import (
    check_divisible,
    head_tail_chunks,
    head_tail_positions,
    shard_head_tail,
    unshard_head_tail,
)
from triaxis.parallel.ring_attention import RingPlan, build_plan, gather_doc_ids, ring_attention

EOS = 0
B, NH, NKV, HD = 2, 4, 2, 8  # grouped-query: two query heads per K/V head
CHUNK = 5  # tokens per head-tail chunk: odd, so documents cross chunk boundaries unevenly


def ragged_doc_ids(seq_len: int) -> torch.Tensor:
    """(2, seq_len) document ids: row 0 ragged documents of 3, 7, 1, 11, ... tokens; row 1
    one long document then short ones. Built from EOS positions, as the trainer does."""
    tokens = torch.ones(2, seq_len, dtype=torch.long)
    for row, lengths in enumerate(([3, 7, 1, 11, 2, 9, 4], [13, 2, 2, 6])):
        end = 0
        while True:
            for n in lengths:
                end += n
                if end > seq_len:
                    return document_ids(tokens, EOS)
                tokens[row, end - 1] = EOS


def inputs(seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, seq_len, HD, generator=g)
    k = torch.randn(B, NKV, seq_len, HD, generator=g)
    v = torch.randn(B, NKV, seq_len, HD, generator=g)
    dy = torch.randn(B, NH, seq_len, HD, generator=g)
    return q, k, v, dy


def dense(q, k, v, dy, doc_ids):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    if doc_ids is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        mask = document_mask(doc_ids, "sdpa")
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    y.backward(dy)
    return y.detach(), q.grad, k.grad, v.grad


def _ring_worker(rank: int, cp: int, seq_len: int, masked: bool):
    import torch.distributed as dist

    q, k, v, dy = inputs(seq_len)
    shard = [shard_head_tail(t, cp, rank, dim=2) for t in (q, k, v, dy)]
    q, k, v, dy = (t.clone().requires_grad_(i < 3) for i, t in enumerate(shard))
    doc_ids = None
    if masked:
        local_ids = shard_head_tail(ragged_doc_ids(seq_len), cp, rank, dim=1)
        doc_ids = gather_doc_ids(local_ids, dist.group.WORLD)
    plan = build_plan(cp, rank, q.shape[2], doc_ids, group=dist.group.WORLD)
    y = ring_attention(q, k, v, plan)
    y.backward(dy)
    return y.detach(), q.grad, k.grad, v.grad, plan.pairs


def _check(results, seq_len, masked):
    got = [unshard_head_tail([r[i] for r in results], dim=2) for i in range(4)]
    want = dense(*inputs(seq_len), ragged_doc_ids(seq_len) if masked else None)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "cp", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]
)
def test_ring_equals_dense_with_documents(cp):
    seq_len = 2 * cp * CHUNK
    results = run_workers(_ring_worker, cp, seq_len, True)
    _check(results, seq_len, masked=True)


@pytest.mark.slow
def test_ring_equals_dense_causal():
    cp = 3
    seq_len = 2 * cp * CHUNK
    results = run_workers(_ring_worker, cp, seq_len, False)
    _check(results, seq_len, masked=False)


def test_one_rank_ring_equals_dense():
    """cp=1: no communication, but the same blocks, merge and backward."""
    check_one_rank_ring_equals_dense()


def check_one_rank_ring_equals_dense() -> None:
    """Ring attention on one rank equals dense SDPA (1e-5), plain and with documents, forward
    and backward (tests/test_cp_kernel_cuda_proxy.py runs it through the CUDA branch too)."""
    seq_len = 4 * CHUNK
    for doc_ids in (None, ragged_doc_ids(seq_len)):
        q, k, v, dy = inputs(seq_len)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        plan = build_plan(1, 0, seq_len, doc_ids)
        y = ring_attention(*leaves, plan)
        y.backward(dy)
        got = (y.detach(), *(t.grad for t in leaves))
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, dense(q, k, v, dy, doc_ids)):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_head_tail_balances_causal_work(cp):
    """Every rank computes 2*cp + 1 (query chunk, key chunk) pairs; the chunks above the
    diagonal are skipped, never computed; each pair appears exactly once over the ring."""
    c = 3
    plans = [build_plan(cp, r, 2 * c, None) for r in range(cp)]
    counts = [len(p.pairs) for p in plans]
    assert counts == [2 * cp + 1] * cp
    every = sorted(pair for p in plans for pair in p.pairs)
    assert every == sorted((i, j) for i in range(2 * cp) for j in range(i + 1))


def test_fully_masked_blocks_are_skipped():
    """Two documents split exactly at the middle: the second half never reads the first."""
    cp, c = 2, 4
    doc_ids = torch.tensor([[0] * (2 * cp * c // 2) + [1] * (2 * cp * c // 2)])
    plans = [build_plan(cp, r, 2 * c, doc_ids) for r in range(cp)]
    every = sorted(pair for p in plans for pair in p.pairs)
    assert every == [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3)]
    # A pair whose keys are all visible runs with no mask at all; plain causal pairs never
    # hold a mask tensor (the diagonal runs the kernel's own causal mode).
    (task,) = [t for t in plans[1].steps[1] if (1, 0) in t.pairs]
    assert task.mask is None and not task.causal
    causal = [t for r in range(cp) for s in build_plan(cp, r, 2 * c).steps for t in s]
    assert all(t.mask is None for t in causal)
    assert sorted(t.pairs[0] for t in causal if t.causal) == [(i, i) for i in range(2 * cp)]


def test_head_tail_shard_round_trip():
    x = torch.arange(24).view(1, 24)
    shards = [shard_head_tail(x, 3, r) for r in range(3)]
    assert shards[0].tolist() == [[0, 1, 2, 3, 20, 21, 22, 23]]
    assert head_tail_chunks(3, 1) == (1, 4)
    assert torch.equal(unshard_head_tail(shards), x)
    assert head_tail_positions(24, 3, 2).tolist() == [8, 9, 10, 11, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="not divisible by 2 x cp = 6"):
        check_divisible(20, 3)


@pytest.mark.parametrize("causal", [False, True])
def test_math_kernel_equals_cpu_kernel(causal):
    """The device-independent kernel (used off CPU) against the CPU flash kernel, one block:
    with a mask holding a row that sees no key, or in causal mode."""
    g = torch.Generator().manual_seed(1)
    q, k, v, dy = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(4))
    mask = empty = None
    if not causal:
        mask = torch.rand(1, 1, 4, 4, generator=g) > 0.4
        mask[..., 0, :] = False
        mask[..., 1:, 0] = True
        empty = ~mask.any(-1)
    cpu = cp_kernel.block_forward(q, k, v, mask, causal, empty)
    name = cp_kernel.kernel_name
    try:
        cp_kernel.kernel_name = lambda device: "math"
        math = cp_kernel.block_forward(q, k, v, mask, causal, empty)
        # Backward with a finite merged lse (as after the ring's merge).
        lse = math[1] if empty is None else math[1].masked_fill(empty, 0.0)
        grads_math = cp_kernel.block_backward(dy, q, k, v, math[0], lse, mask, causal)
    finally:
        cp_kernel.kernel_name = name
    grads_cpu = cp_kernel.block_backward(dy, q, k, v, cpu[0], lse, mask, causal)
    for a, b in zip((*cpu, *grads_cpu), (*math, *grads_math)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert RingPlan(1, 0, None).pairs == []
