"""Sampling from a trained checkpoint (one process, no parallelism needed)."""

from __future__ import annotations

import torch

from triaxis import storage
from triaxis.checkpoint.dcp import META, complete_checkpoints
from triaxis.checkpoint.dcp_io import checked, load_model_weights
from triaxis.data.dataset import read_manifest
from triaxis.data.tokenizer import load_tokenizer
from triaxis.errors import UserError
from triaxis.model import ModelArgs, Transformer


def find_checkpoint(path: str) -> str:
    """A run folder (its latest checkpoint), a checkpoints folder, or one checkpoint."""
    if storage.exists(storage.join(path, META)):
        return str(path)
    for folder in (storage.join(path, "checkpoints"), str(path)):
        found = complete_checkpoints(folder)
        if found:
            return found[-1]
    raise UserError(f"no complete checkpoint under {path}; pass a run folder that has trained "
                    "with checkpoints on, or a step_XXXXXXXX folder")


def load_for_inference(path: str, device: str = "cpu") -> tuple[Transformer, object, str]:
    ckpt = find_checkpoint(path)
    meta = checked(ckpt)  # names, sizes; its items are verified as they load
    args = ModelArgs(**meta["model"])
    data_path = meta.get("data_path") or ""
    if not data_path:
        raise UserError(f"{ckpt} does not record its data folder: cannot find its tokenizer")
    tok = load_tokenizer(data_path, read_manifest(data_path)["tokenizer"])
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize(device)
    model.init_weights(0)  # fills the RoPE buffer; the weights come from the checkpoint
    load_model_weights(model, ckpt, meta)
    return model.eval(), tok, ckpt


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 0.8, top_k: int = 50, seed: int = 0,
             eos_id: int | None = None) -> list[int]:
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
    return ids[0, len(prompt_ids):].tolist()
