"""Chat fine-tuning through the CLI, as the README walks through it: a Hugging Face Llama folder
with a chat template -> import-hf -> prepare --format chat -> launch 2 dp_shard processes from
the imported weights -> export-hf -> transformers generates the reply the chat set taught."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
import torch
import transformers

from tests.chat_data import BOS, CHATML, DOC_MASK, END, EOS, WORDS, chat_tokenizer
from tests.helpers import TINY_LLAMA, losses, triaxis

SHAPE = TINY_LLAMA
REPLY = "✓ fine-tune"


@pytest.mark.slow
def test_chat_finetune_export_generate(tmp_path):
    hf, ckpt, data, run, out = (tmp_path / n for n in ("hf", "ckpt", "data", "run", "out"))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=chat_tokenizer(), bos_token=BOS, eos_token=EOS, chat_template=CHATML
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE, vocab_size=len(fast), tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    fast.save_pretrained(hf)  # tokenizer.json, tokenizer_config.json, chat_template.jinja

    printed = triaxis("import-hf", hf, "--output", ckpt).stdout
    overrides = shlex.split(printed.split(f"--checkpoint.initial={ckpt}")[1].splitlines()[0])

    # Varied questions, one answer: what the model must learn; the questions are never trained
    # on (masked), so the loss is over the reply tokens alone.
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{WORDS[i % 10]} {WORDS[(i * 7) % 10]} {i}?"},
                {"role": "assistant", "content": REPLY},
            ]
        }
        for i in range(200)
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    triaxis(
        "prepare", "--input", chat, "--format", "chat", "--tokenizer", f"hf:{hf}", "--output", data
    )
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["input_format"] == "chat" and "loss_mask" in manifest

    triaxis(
        "launch",
        "--nproc-per-node",
        2,
        f"--data.path={data}",
        "--data.seq_len=64",
        f"--train.run_dir={run}",
        "--train.global_batch=8",
        "--train.micro_batch=2",
        "--train.steps=40",
        "--train.lr=3e-3",
        "--train.warmup_steps=2",
        "--train.val_every=0",
        "--metrics.log_every=1",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
        "--parallel.dp_shard=2",
        f"--checkpoint.initial={ckpt}",
        *(f"--{k.replace('__', '.')}={v}" for k, v in DOC_MASK.items()),
        *overrides,
        timeout=600,
    )
    trained = losses(run)
    assert sorted(trained) == list(range(1, 41)) and trained[40] < 0.3 * trained[1], trained

    triaxis("export-hf", run, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (hf / name).exists():
            shutil.copy(hf / name, out / name)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "token shard 999?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    end_id = tok.convert_tokens_to_ids(END)
    with torch.no_grad():
        gen = model.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=end_id, pad_token_id=end_id
        )
    reply = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)
    assert reply.startswith(REPLY + END), reply
