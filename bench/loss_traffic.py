"""Memory traffic of the LM head + cross-entropy, forward and backward: the plain path
(F.cross_entropy over the head's logits) against the fused, chunked one (triaxis.model.loss).

    python bench/loss_traffic.py [--tokens 2048] [--dim 128] [--vocab 16384] [--chunk 512]

Counted, not timed (so the figures hold on a loaded machine and say what a GPU, where the loss
is memory-bound, would move): a TorchDispatchMode adds up, for every op that computes (views and
aliases excluded), the bytes of its tensor inputs (read) and of its outputs (written). A
kernel that reads its input twice (a softmax's max then sum) counts once, so both paths are
under-counted the same way. fp32, and bf16 under autocast (the GPU's path: bf16 products, fp32
softmax). Not a test: prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from triaxis.model.loss import chunked_cross_entropy


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# Ops that touch a few elements of a large tensor: (which argument, elements touched given the
# op's arguments and output). Counting that tensor whole would charge a gather over the logits
# as a full pass.
_SPARSE = {
    "aten.index.Tensor": (0, lambda args, out: out.numel()),
    "aten.index_put_.default": (0, lambda args, out: args[2].numel()),
    "aten.nll_loss_forward.default": (0, lambda args, out: args[1].numel()),
    "aten.nll_loss_backward.default": (1, lambda args, out: 0),  # writes its output whole
}


class Traffic(TorchDispatchMode):
    """Bytes read and written by the ops that run under it."""

    def __init__(self):
        super().__init__()
        self.read = self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        given = [t for t in tree_leaves((args, kwargs.get("out"))) if isinstance(t, torch.Tensor)]
        if not func._schema.is_mutable and any(
            t.untyped_storage().data_ptr() in {g.untyped_storage().data_ptr() for g in given}
            for t in outs
        ):
            return out  # a view (t, view, detach, expand) moves nothing
        ins = [
            t
            for t in tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
            if isinstance(t, torch.Tensor)
        ]
        read, written = _bytes(ins), _bytes(outs)
        sparse = _SPARSE.get(str(func))
        if sparse is not None:
            big = args[sparse[0]]
            touched = sparse[1](args, outs[0]) * big.element_size()
            read += touched - _bytes([big])
            if func._schema.is_mutable:  # index_put_: writes the touched elements only
                written = touched
        self.read += read
        self.written += written
        return out


def measure(args, fused: bool, bf16: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.dim, generator=gen).requires_grad_()
    w = (torch.randn(args.vocab, args.dim, generator=gen) * 0.02).requires_grad_()
    t = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    with Traffic() as traffic:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:
                loss = chunked_cross_entropy(h, w, t, args.chunk)
            else:
                loss = F.cross_entropy(F.linear(h, w).float(), t)
        loss.backward()
    return {"read": traffic.read, "written": traffic.written}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()
    logits_fp32 = args.tokens * args.vocab * 4
    rows = []
    print(f"{'dtype':<6} {'path':<6} {'read MB':>9} {'written MB':>11} {'total / fp32 logits':>20}")
    for bf16 in (False, True):
        got = {p: measure(args, p == "fused", bf16) for p in ("plain", "fused")}
        for path, m in got.items():
            total = m["read"] + m["written"]
            dtype = "bf16" if bf16 else "fp32"
            rows.append({"dtype": dtype, "path": path, **m})
            print(
                f"{dtype:<6} {path:<6} {m['read'] / 1e6:>9.1f} {m['written'] / 1e6:>11.1f} "
                f"{total / logits_fp32:>20.2f}"
            )
        ratio = sum(got["fused"].values()) / sum(got["plain"].values())
        print(f"{'':<6} fused / plain traffic: {ratio:.2f}")
        rows.append({"dtype": "bf16" if bf16 else "fp32", "fused_over_plain": round(ratio, 3)})
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
