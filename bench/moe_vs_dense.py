"""MoE vs a dense model of the same active parameters, trained N steps on the same batches, CPU.

Three single-process runs of the same Transformer (AdamW, fp32, a fixed stream of tokens with a
learnable pattern): the dense model whose MLP has k x moe_ffn_dim hidden units (the active
parameters of the MoE), triaxis's MoE block (E experts, top k), and the plain-PyTorch MoE: the
same weights run by HF Mixtral's way (a boolean mask and a loop over experts per block). Prints
process CPU time per step (median), tokens per CPU second, the final loss of each, and the
ratios triaxis MoE / plain MoE and MoE / dense.

    python bench/moe_vs_dense.py [--steps 30] [--experts 8] [--k 2]

Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from triaxis.model.llama import ModelArgs, Transformer
from triaxis.model.moe import MoE


def plain_moe_forward(self: MoE, x: torch.Tensor) -> torch.Tensor:
    """HF Mixtral's dispatch: for each expert, the tokens that chose it, by a mask."""
    B, T, D = x.shape
    flat = x.reshape(-1, D)
    probs = F.softmax(self.router.gate(flat).float(), dim=-1)
    weights, chosen = torch.topk(probs, self.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(flat.dtype)
    out = torch.zeros_like(flat)
    ex = self.experts
    for e in range(self.n_experts):
        tok, slot = torch.where(chosen == e)
        if tok.numel() == 0:
            continue
        xe = flat[tok]
        y = (F.silu(xe @ ex.w1[e]) * (xe @ ex.w3[e])) @ ex.w2[e]
        out = out.index_add(0, tok, y * weights[tok, slot, None])
    return out.view(B, T, D)


def batches(steps: int, batch: int, seq: int, vocab: int):
    """Token t+1 = (token t * 5 + 3) mod vocab after a random start: learnable, not trivial."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        cols = [torch.randint(0, vocab, (batch,), generator=gen)]
        for _ in range(seq):
            cols.append((cols[-1] * 5 + 3) % vocab)
        yield torch.stack(cols, dim=1)


def run(args: ModelArgs, steps: int, batch: int, plain: bool) -> dict:
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(seed=0)
    if plain:
        for m in model.modules():
            if isinstance(m, MoE):
                m.forward = plain_moe_forward.__get__(m)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    times, loss = [], float("nan")
    for tokens in batches(steps, batch, args.max_seq_len, args.vocab_size):
        t0 = time.process_time()
        logits = model(tokens[:, :-1])
        loss_t = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss_t.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t0)
        loss = loss_t.item()
    step_s = statistics.median(times[2:] or times)
    active = sum(p.numel() for p in model.parameters())
    return {"step_cpu_s": step_s, "tokens_per_cpu_s": batch * args.max_seq_len / step_s,
            "final_loss": loss, "params": active}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="one expert's hidden size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(1)
    shape = dict(dim=a.dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                 max_seq_len=a.seq, rope_theta=10000.0)  # fmt: skip
    dense = ModelArgs(**shape, ffn_dim=a.k * a.hidden)
    moe = ModelArgs(**shape, ffn_dim=a.hidden, n_experts=a.experts, moe_top_k=a.k,
                    moe_ffn_dim=a.hidden)  # fmt: skip
    out = {
        "dense": run(dense, a.steps, a.batch, plain=False),
        "moe_triaxis": run(moe, a.steps, a.batch, plain=False),
        "moe_plain": run(moe, a.steps, a.batch, plain=True),
    }
    for name, r in out.items():
        ms, tps = r["step_cpu_s"] * 1e3, r["tokens_per_cpu_s"]
        print(f"{name:12s} {r['params'] / 1e6:6.2f}M params  {ms:8.1f} ms/step (CPU)  "
              f"{tps:9.0f} tok/CPU-s  loss {r['final_loss']:.4f}")  # fmt: skip
    t, pl, d = out["moe_triaxis"], out["moe_plain"], out["dense"]
    print(f"ratio step time triaxis MoE / plain MoE: {t['step_cpu_s'] / pl['step_cpu_s']:.2f}")
    print(f"ratio step time triaxis MoE / dense (same active params): "
          f"{t['step_cpu_s'] / d['step_cpu_s']:.2f}")  # fmt: skip
    print(json.dumps({"args": vars(a), **out}))


if __name__ == "__main__":
    main()
