"""Activation checkpointing and offload: step time and activation memory, triaxis beside plain
PyTorch doing the same by hand (torch.utils.checkpoint per block, the list form of the
selective-checkpoint API, save_on_cpu for offload).

    python bench/activation_memory.py [--preset small] [--batch 4] [--seq 256] [--device cpu]

Memory: on CUDA the step's peak allocated bytes above the model's; on CPU the bytes forward
leaves alive for backward (every storage forward creates that still lives when it returns).
Time: median of --repeat forward + backward steps after one warm-up. Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_activation_memory import KeptBytes  # noqa: E402  (one measuring mode)
from triaxis.model.llama import Transformer
from triaxis.model.presets import PRESETS
from triaxis.parallel.activations import apply_ac

MODES = {  # name: (activation_checkpoint, ac_selective, activation_offload)
    "none": ("none", "block", False),
    "every 2nd block": ("selective", "block", False),
    "op-level": ("selective", "op", False),
    "full": ("full", "block", False),
    "full + offload": ("full", "block", True),
}


def plain_forward(model: Transformer, tokens, mode: tuple[str, str, bool]):
    """The same model run block by block with torch's own APIs."""
    ac, selective, offload = mode
    aten = torch.ops.aten
    # torchtitan's op-level list: the matmuls and the attention kernels.
    mm = [
        aten.mm.default,
        aten.addmm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
    ]
    h = model.tok_embeddings(tokens)
    for i, block in enumerate(model.layers.values()):
        wrap = ac == "full" or (ac == "selective" and (selective == "op" or i % 2 == 1))
        if not wrap:
            h = block(h, model.rope)
            continue
        kw = {"use_reentrant": False, "preserve_rng_state": False}
        if selective == "op" and ac == "selective":
            kw["context_fn"] = partial(create_selective_checkpoint_contexts, mm)
        if offload:
            with torch.autograd.graph.saved_tensors_hooks(*_save_on_cpu(tokens.is_cuda)):
                h = checkpoint(block, h, model.rope, **kw)
        else:
            h = checkpoint(block, h, model.rope, **kw)
    return model.output(model.norm(h))


def _save_on_cpu(pin: bool):
    hooks = torch.autograd.graph.save_on_cpu(pin_memory=pin)
    return hooks.pack_hook, hooks.unpack_hook


def measure(step, device: torch.device, repeat: int) -> tuple[float, int]:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() - base
    else:
        with KeptBytes() as kept:
            loss = step(backward=False)
        mem = kept.kept()
        loss.backward()
    return statistics.median(times), mem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    with torch.device(device):
        base = Transformer(PRESETS[a.preset])
    base.init_weights(0)
    tokens = torch.randint(0, base.args.vocab_size, (a.batch, a.seq), device=device)
    print(f"{a.preset} on {device}, {a.batch} x {a.seq} tokens, fp32")
    print(
        f"{'mode':<18} {'triaxis s':>10} {'plain s':>9} {'ratio':>6} {'triaxis MiB':>12} "
        f"{'plain MiB':>10}"
    )
    for name, mode in MODES.items():
        ours = copy.deepcopy(base)
        if mode[0] != "none":
            apply_ac(ours, mode[0], 2, mode[1], mode[2], device)
        plain = copy.deepcopy(base)

        def step_ours(backward=True, m=ours):
            loss = m(tokens).logsumexp(-1).mean()
            if backward:
                loss.backward()
            return loss

        def step_plain(backward=True, m=plain, mode=mode):
            loss = plain_forward(m, tokens, mode).logsumexp(-1).mean()
            if backward:
                loss.backward()
            return loss

        t_ours, m_ours = measure(step_ours, device, a.repeat)
        t_plain, m_plain = measure(step_plain, device, a.repeat)
        print(
            f"{name:<18} {t_ours:>10.3f} {t_plain:>9.3f} {t_ours / t_plain:>6.2f} "
            f"{m_ours / 2**20:>12.1f} {m_plain / 2**20:>10.1f}"
        )


if __name__ == "__main__":
    main()
