"""The whole fine-tuning flow through the CLI, as the README gives it: a Hugging Face Llama folder
(weights with Llama 3.1 RoPE scaling, and its tokenizer) -> import-hf -> prepare with the
model's tokenizer -> launch 2 sharded processes from the imported weights with the printed
overrides -> export-hf -> transformers loads the fine-tuned model with triaxis's logits."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers import TINY_LLAMA, losses, triaxis
from tests.test_tokenizer_hf import EOS, WORDS, llama_like_tokenizer

SHAPE = dict(
    TINY_LLAMA,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
)


def hf_model_folder(folder: Path) -> transformers.LlamaForCausalLM:
    """A complete HF model folder: config, safetensors weights, tokenizer files."""
    tok = llama_like_tokenizer()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **SHAPE, vocab_size=tok.get_vocab_size(), tie_word_embeddings=False
        )
    ).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return model


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.slow
def test_import_prepare_finetune_export(tmp_path):
    hf, ckpt, data, run, out = (tmp_path / n for n in ("hf", "ckpt", "data", "run", "out"))
    original = hf_model_folder(hf)
    printed = triaxis("import-hf", hf, "--output", ckpt).stdout
    overrides = shlex.split(printed.split(f"--checkpoint.initial={ckpt}")[1].splitlines()[0])
    assert "--model.rope_scaling=llama3" in overrides

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(60):
        (docs / f"{i:03d}.txt").write_text(
            " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40 + i % 13))
        )
    triaxis(
        "prepare",
        "--input",
        docs,
        "--tokenizer",
        f"hf:{hf}",
        "--output",
        data,
        "--val-fraction",
        "0.1",
    )
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["tokenizer"]["eos_token"] == EOS

    triaxis(
        "launch",
        "--nproc-per-node",
        2,
        f"--data.path={data}",
        "--data.seq_len=32",
        f"--train.run_dir={run}",
        "--train.global_batch=8",
        "--train.micro_batch=2",
        "--train.steps=6",
        "--train.lr=1e-3",
        "--train.warmup_steps=1",
        "--train.val_every=0",
        "--metrics.log_every=1",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
        "--parallel.dp_shard=2",
        f"--checkpoint.initial={ckpt}",
        *overrides,
        timeout=300,
    )
    trained = losses(run)
    assert sorted(trained) == list(range(1, 7)) and trained[6] < trained[1], trained

    triaxis("export-hf", run, out)
    tuned = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert tuned.config.rope_parameters["rope_type"] == "llama3"
    from triaxis.checkpoint.inference import load_checkpoint_model
    from triaxis.model.llama import model_rope_tables

    ours, _ = load_checkpoint_model(str(run))
    ours.rope.copy_(model_rope_tables(ours.args))
    tokens = torch.randint(
        0, original.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(
        logits(tuned, tokens), logits(ours.eval(), tokens), rtol=1e-5, atol=1e-5
    )
    assert (logits(tuned, tokens) - logits(original, tokens)).abs().max() > 1e-3  # it trained
    # ... from the imported weights: 6 AdamW steps at lr <= 1e-3 move no weight by 1e-2, while
    # a fresh initialization would differ from them everywhere by ~0.02 per element.
    before = original.state_dict()
    drift = max((t - before[n]).abs().max().item() for n, t in tuned.state_dict().items())
    assert 0 < drift < 1e-2, drift

    sample = triaxis(
        "generate", "--checkpoint", run, "--prompt", "def return", "--max-new-tokens", 8
    ).stdout
    assert sample.strip()
