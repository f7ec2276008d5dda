"""Ring attention over a cp process group: each rank keeps its queries, K/V blocks go around.

Every cp rank holds a head-tail shard of the sequence (triaxis.parallel.cp_shard): chunks r and
2cp-1-r of 2*cp. At ring step s rank r holds the K/V of rank (r - s) mod cp; while it computes
with them it already sends them on to rank r+1 and receives the next block from rank r-1
(isend/irecv, so the transfer overlaps the block's compute). Each (query chunk, key chunk) pair
is attended separately and the partial outputs merge by log-sum-exp (online softmax), so the
result equals attention over the whole sequence.

Masks: causality and document boundaries compose into one mask per (query chunk, key chunk)
pair, built once per forward from global positions and document ids (`RingPlan`) and shared by
every layer. A pair with no visible key at all (a key chunk after the query chunk, or holding
only other documents) is skipped, never computed; a pair with every key visible runs without a
mask. Plain causal attention thus computes 2*cp + 1 chunk pairs on every rank.

Backward is its own autograd.Function: K/V go around the ring again, each rank adds its share of
dK/dV to an accumulator that travels with them and arrives back at the owner after cp hops. The
per-block kernels (triaxis.parallel.cp_kernel) take the merged output and log-sum-exp, which
makes each block's gradient exact.

Memory: a rank holds its own Q/K/V, the K/V block it computes with and the one arriving, and
the merged output: O(T / cp).
The all-gather variant would hold every rank's K/V, O(T) per rank per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from triaxis.parallel.cp_kernel import block_backward, block_forward
from triaxis.parallel.cp_shard import head_tail_chunks, head_tail_positions


@dataclass
class BlockTask:
    """One kernel call: local query half `q_half` against keys `k_start:k_stop` of the block
    (one key chunk)."""

    q_half: int
    k_start: int
    k_stop: int
    causal: bool  # the diagonal chunk pair of plain causal attention (no mask tensor)
    mask: torch.Tensor | None  # (B, 1, c, c) bool, True = attend; None = all visible
    empty_rows: torch.Tensor | None  # (B, 1, c) rows with no visible key, None = none
    pairs: list[tuple[int, int]]  # the (query chunk, key chunk) pair it computes


@dataclass
class RingPlan:
    """What each ring step computes on this rank; built once per forward, used by every layer."""

    cp: int
    rank: int
    group: object | None
    steps: list[list[BlockTask]] = field(default_factory=list)  # steps[s]: K/V of rank r - s

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [p for step in self.steps for task in step for p in task.pairs]


def build_plan(
    cp: int,
    rank: int,
    local_len: int,
    doc_ids: torch.Tensor | None = None,
    group=None,
    device=None,
) -> RingPlan:
    """The plan of cp rank `rank` holding `local_len` tokens. doc_ids: (B, T) document ids of
    the *whole* sequence (every cp rank's; see gather_doc_ids), or None for plain causal."""
    if local_len % 2:
        raise ValueError(f"a cp shard holds two equal chunks; got {local_len} tokens")
    c = local_len // 2
    seq_len = local_len * cp
    if doc_ids is not None:
        device = doc_ids.device
    pos = [head_tail_positions(seq_len, cp, r, device) for r in range(cp)]
    plan = RingPlan(cp, rank, group)
    for step in range(cp):
        src = (rank - step) % cp
        tasks = []
        for half, q_chunk in enumerate(head_tail_chunks(cp, rank)):
            for kc, k_chunk in enumerate(head_tail_chunks(cp, src)):
                if k_chunk > q_chunk:
                    continue  # every key after every query: skipped, never computed
                task = BlockTask(half, kc * c, (kc + 1) * c, k_chunk == q_chunk, None, None, [])
                task.pairs.append((q_chunk, k_chunk))
                q_pos = pos[rank][half * c : (half + 1) * c]
                k_pos = pos[src][task.k_start : task.k_stop]
                if doc_ids is not None and not _apply_documents(task, doc_ids, q_pos, k_pos):
                    continue  # only other documents' keys: skipped too
                tasks.append(task)
        plan.steps.append(tasks)
    return plan


def _apply_documents(task: BlockTask, doc_ids, q_pos, k_pos) -> bool:
    """Compose the document mask into `task`; False when no key is visible at all. Plain
    causal pairs need no mask tensor (off-diagonal: all visible; diagonal: is_causal)."""
    visible = doc_ids[:, q_pos, None] == doc_ids[:, None, k_pos]  # (B, c, c)
    if task.causal:
        visible = visible & (q_pos[:, None] >= k_pos[None, :])
    if not bool(visible.any()):
        return False
    if not bool(visible.all()):
        task.causal, task.mask = False, visible[:, None]  # the mask carries causality too
        rows = ~visible.any(-1)
        task.empty_rows = rows[:, None] if bool(rows.any()) else None
    return True


def gather_doc_ids(local_doc_ids: torch.Tensor, group) -> torch.Tensor:
    """(B, T/cp) head-tail shard of document ids -> (B, T) the whole row's, from every cp rank
    (one small all-gather per forward, on the ids' own device)."""
    from triaxis.parallel.cp_shard import unshard_head_tail

    cp = dist.get_world_size(group)
    parts = [torch.empty_like(local_doc_ids) for _ in range(cp)]
    dist.all_gather(parts, local_doc_ids.contiguous(), group=group)
    return unshard_head_tail(parts, dim=1)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan):
    """q (B, nh, T/cp, hd), k/v (B, nkv, T/cp, hd) head-tail shards -> (B, nh, T/cp, hd)."""
    return _RingAttention.apply(q, k, v, plan)


class _Ring:
    """A ring exchange: send to rank r+1, receive from rank r-1, started now, waited later."""

    def __init__(self, plan: RingPlan, tensor: torch.Tensor, tag: int):
        self.buffer = torch.empty_like(tensor)
        group, cp, r = plan.group, plan.cp, plan.rank
        nxt = dist.get_global_rank(group, (r + 1) % cp)
        prv = dist.get_global_rank(group, (r - 1) % cp)
        self.works = [
            dist.isend(tensor, nxt, group=group, tag=tag),
            dist.irecv(self.buffer, prv, group=group, tag=tag),
        ]

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        return self.buffer


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if n == 1 else t.repeat_interleave(n, dim=1)


def _fold(t: torch.Tensor, n: int) -> torch.Tensor:
    """Sum the gradient of K/V repeated to every query head back onto the K/V heads."""
    return t if n == 1 else t.unflatten(1, (-1, n)).sum(2)


def _merge(out, lse, block_out, block_lse):
    """Online softmax: combine two partial attentions of the same query rows (fp32 out)."""
    new_lse = torch.logaddexp(lse, block_lse)
    finite = torch.isfinite(new_lse)
    safe = torch.where(finite, new_lse, torch.zeros_like(new_lse))
    w_old = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(lse))
    w_new = torch.where(finite, torch.exp(block_lse - safe), torch.zeros_like(lse))
    return out * w_old[..., None] + block_out.float() * w_new[..., None], new_lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        B, H, L, D = q.shape
        c, rep = L // 2, H // k.shape[1]
        out = [torch.zeros(B, H, c, D, device=q.device) for _ in (0, 1)]
        lse = [torch.full((B, H, c), float("-inf"), device=q.device) for _ in (0, 1)]
        kv = torch.stack([k, v]).contiguous()
        for step, tasks in enumerate(plan.steps):
            ring = _Ring(plan, kv, tag=0) if step < plan.cp - 1 else None
            for t in tasks:
                qh = q[:, :, t.q_half * c : (t.q_half + 1) * c].contiguous()
                kb = _repeat(kv[0, :, :, t.k_start : t.k_stop], rep).contiguous()
                vb = _repeat(kv[1, :, :, t.k_start : t.k_stop], rep).contiguous()
                o, s = block_forward(qh, kb, vb, t.mask, t.causal, t.empty_rows)
                out[t.q_half], lse[t.q_half] = _merge(out[t.q_half], lse[t.q_half], o, s)
            if ring is not None:
                kv = ring.wait()
        y = torch.cat(out, dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, v, y, torch.cat(lse, dim=2))
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, y, lse = ctx.saved_tensors
        plan: RingPlan = ctx.plan
        c, rep = q.shape[2] // 2, q.shape[1] // k.shape[1]
        dy = dy.contiguous()
        dq = torch.zeros(q.shape, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, device=q.device)  # the accumulator of the block held now
        dkv_ring = None
        for step, tasks in enumerate(plan.steps):
            kv_ring = _Ring(plan, kv, tag=0) if step < plan.cp - 1 else None
            grads = []  # computed before waiting for the accumulator: overlaps its transfer
            for t in tasks:
                rows = slice(t.q_half * c, (t.q_half + 1) * c)
                kb = _repeat(kv[0, :, :, t.k_start : t.k_stop], rep).contiguous()
                vb = _repeat(kv[1, :, :, t.k_start : t.k_stop], rep).contiguous()
                g = block_backward(
                    dy[:, :, rows].contiguous(),
                    q[:, :, rows].contiguous(),
                    kb,
                    vb,
                    y[:, :, rows].contiguous(),
                    lse[:, :, rows].contiguous(),
                    t.mask,
                    t.causal,
                )
                grads.append((t, g))
            if dkv_ring is not None:
                dkv = dkv_ring.wait()
            for t, (dq_b, dk_b, dv_b) in grads:
                dq[:, :, t.q_half * c : (t.q_half + 1) * c] += dq_b.float()
                dkv[0, :, :, t.k_start : t.k_stop] += _fold(dk_b.float(), rep)
                dkv[1, :, :, t.k_start : t.k_stop] += _fold(dv_b.float(), rep)
            # After cp hops the accumulator of every block is back at its owner.
            dkv_ring = _Ring(plan, dkv, tag=1) if plan.cp > 1 else None
            if kv_ring is not None:
                kv = kv_ring.wait()
        if dkv_ring is not None:
            dkv = dkv_ring.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None
