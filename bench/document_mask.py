"""Step time of document-masked attention against the plain causal one, in the same run.

    python bench/document_mask.py [--device cpu|cuda] [--dim 256] [--layers 4] [--batch 4]
                                  [--seq 512] [--doc-tokens 128] [--repeats 5]

One forward + backward of the same model on the same packed windows (documents of random
lengths, mean --doc-tokens, each ended by EOS): unmasked (plain PyTorch scaled_dot_product_attention
with is_causal, what data.document_mask=false runs) and masked (data.document_mask=true: the
dense block-diagonal mask through SDPA on CPU, FlexAttention compiled on CUDA). Also: the
documents run one by one, batch 1 each (the plain-PyTorch way to keep them apart without a
mask). And the attention op alone, masked and not (its rows' ratio is to the unmasked op).
Median of --repeats steps after two warm-ups (the compile on CUDA), the variants taking turns.
Not a test: prints a table, the ratios and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--doc-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from triaxis.model import PRESETS, Transformer
    from triaxis.model.attention import attend, attention_backend, document_ids, document_mask

    dev = torch.device(args.device)
    margs = dataclasses.replace(
        PRESETS["tiny"],
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.dim // 64,
        n_kv_heads=max(1, args.dim // 128),
        ffn_dim=int(args.dim * 3.5) // 64 * 64,
        vocab_size=8192,
        max_seq_len=args.seq,
    )
    with torch.device("meta"):
        model = Transformer(margs)
    model.materialize(dev)
    model.init_weights(0)
    eos = 0
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, margs.vocab_size, (args.batch, args.seq + 1), generator=g)
    # Document ends: geometric gaps of mean doc_tokens (a typical packed corpus).
    ends = torch.rand(tokens.shape, generator=g) < 1.0 / args.doc_tokens
    tokens[ends] = eos
    tokens = tokens.to(dev)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def loss_of(x, y, doc_ids=None):
        with autocast:
            logits = model(x, doc_ids=doc_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")

    def unmasked():
        loss_of(inputs, targets).backward()

    def masked():
        loss_of(inputs, targets, document_ids(inputs, eos)).backward()

    spans = []
    for row in range(args.batch):
        cut = [0] + [i + 1 for i in (inputs[row] == eos).nonzero().flatten().tolist()]
        cut += [args.seq] if cut[-1] != args.seq else []
        spans += [(row, s, e) for s, e in zip(cut, cut[1:])]

    def one_by_one():
        for row, s, e in spans:
            loss_of(inputs[row : row + 1, s:e], targets[row : row + 1, s:e]).backward()

    def once(fn) -> float:
        model.zero_grad(set_to_none=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # The attention op alone (one layer's q, k, v; the mask built inside, as each step does):
    # in the whole step the projections, MLP and head dominate at these lengths.
    heads, kv = margs.n_heads, margs.n_kv_heads
    q = torch.randn(args.batch, heads, args.seq, margs.head_dim, device=dev, requires_grad=True)
    k, v = (
        torch.randn(args.batch, kv, args.seq, margs.head_dim, device=dev, requires_grad=True)
        for _ in range(2)
    )

    def op(doc_mask: bool):
        mask = document_mask(document_ids(inputs, eos)) if doc_mask else None
        attend(q, k, v, mask, gqa=heads != kv).sum().backward()

    variants = {
        "unmasked (is_causal)": unmasked,
        f"masked ({attention_backend(dev)})": masked,
        "documents one by one": one_by_one,
        "attention op alone, unmasked": lambda: op(False),
        "attention op alone, masked": lambda: op(True),
    }
    for fn in variants.values():  # warm-up (and the compile on CUDA)
        once(fn), once(fn)
    # Round-robin, so a change in the machine's load hits every variant alike.
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(once(fn))
    rows = {name: statistics.median(t) for name, t in times.items()}
    base = rows["unmasked (is_causal)"]
    op_ratio = rows["attention op alone, masked"] / rows["attention op alone, unmasked"]
    docs = len(spans)
    print(
        f"{args.device}: dim {args.dim}, {args.layers} layers, {args.batch} x {args.seq} tokens, "
        f"{docs} documents (mean {args.batch * args.seq / docs:.0f} tokens)"
    )
    print("| attention | step s | vs unmasked |\n|---|---|---|")
    for name, t in rows.items():
        ratio = t / base if "alone" not in name else t / rows["attention op alone, unmasked"]
        print(f"| {name} | {t:.4f} | {ratio:.2f}x |")
    print(f"step masked/unmasked {rows[list(rows)[1]] / base:.2f}x, attention op {op_ratio:.2f}x")
    print(json.dumps({"device": args.device, "documents": docs, **vars(args), "step_s": rows}))


if __name__ == "__main__":
    main()
