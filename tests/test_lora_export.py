"""export-hf --lora / --merge against peft and transformers: the trained LoRA model's logits."""

import pytest
import torch

from tests.parity import train_collect
from tests.test_lora import LORA
from triaxis.cli import main

peft = pytest.importorskip("peft", reason="the test extra installs peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lora_run(byte_data, tmp_path_factory):
    """A LoRA checkpoint (wq: RoPE row order; wo, w1, w2) and the triaxis model's logits."""
    from triaxis.hf.lora_export import load_lora_model
    from triaxis.model.llama import model_rope_tables

    tmp = tmp_path_factory.mktemp("lora_export")
    ckpt = str(tmp / "ckpt")
    train_collect(
        0,
        1,
        byte_data,
        str(tmp / "run"),
        {
            **LORA,
            "train__micro_batch": 4,
            "checkpoint__dir": ckpt,
            "checkpoint__save_final": "true",
        },
    )
    model, _, _ = load_lora_model(ckpt)
    model.rope.copy_(model_rope_tables(model.args))
    tokens = torch.randint(
        0, model.args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        want = model.eval()(tokens).float()
    return ckpt, tokens, want


def _logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens).logits.float()


def test_lora_export_loads_in_peft_with_triaxis_logits(lora_run, tmp_path):
    ckpt, tokens, want = lora_run
    assert main(["export-hf", ckpt, str(tmp_path / "base")]) == 0
    assert main(["export-hf", ckpt, str(tmp_path / "adapter"), "--lora"]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    base_logits = _logits(base, tokens)
    # The adapters moved the model: a wrong adapter export cannot hide behind the base.
    assert (base_logits - want).abs().max() > 1e-3
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(model, tokens), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the adapter export is the fast lane's representative
def test_merge_export_loads_in_transformers_with_triaxis_logits(lora_run, tmp_path):
    ckpt, tokens, want = lora_run
    assert main(["export-hf", ckpt, str(tmp_path / "merged"), "--merge"]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(_logits(merged, tokens), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # trains a run of its own
def test_lora_export_of_a_full_run_is_one_line(byte_data, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    train_collect(
        0,
        1,
        byte_data,
        str(tmp_path / "run"),
        {"train__steps": 1, "train__micro_batch": 8, "checkpoint__dir": ckpt,
         "checkpoint__save_final": "true"},
    )  # fmt: skip
    assert main(["export-hf", ckpt, str(tmp_path / "out"), "--lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not from a LoRA run" in err[0], err
    assert not (tmp_path / "out").exists()


def test_generate_loads_a_lora_run_with_its_adapters(lora_run):
    """`triaxis generate` (load_for_inference) of a LoRA run samples base + adapters, not the
    base alone."""
    from triaxis.checkpoint.inference import load_for_inference

    ckpt, tokens, want = lora_run
    model, _, _ = load_for_inference(ckpt, "cpu", "")
    with torch.no_grad():
        got = model(tokens).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
