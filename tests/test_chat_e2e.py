"""Chat fine-tuning through the CLI, as the README walks through it: a Hugging Face Llama folder
with a chat template -> import-hf -> prepare --format chat -> launch 2 dp_shard processes from
the imported weights -> the run's own Hugging Face folder (checkpoint.hf=final: the full model,
or with LoRA the PEFT adapter) -> transformers (+ peft) generates the reply the chat set taught,
with nothing copied by hand."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import transformers

from tests.chat_data import BOS, CHATML, DOC_MASK, END, EOS, WORDS, chat_tokenizer
from tests.helpers import TINY_LLAMA, losses, triaxis

SHAPE = TINY_LLAMA
REPLY = "✓ fine-tune"


LORA = [
    "--lora.enabled=true",
    "--lora.rank=16",
    "--lora.alpha=32",
    "--lora.targets=attention.wq,attention.wk,attention.wv,attention.wo,"
    "feed_forward.w1,feed_forward.w2,feed_forward.w3",
]
TUNING = {
    "full": ["--train.lr=3e-3", "--train.steps=40"],
    "lora": ["--train.lr=1e-2", "--train.steps=40", *LORA],
}


@pytest.mark.slow
@pytest.mark.parametrize("tuning", list(TUNING))
def test_chat_finetune_writes_a_folder_that_generates(tuning, tmp_path):
    hf, ckpt, data, run = (tmp_path / n for n in ("hf", "ckpt", "data", "run"))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=chat_tokenizer(), bos_token=BOS, eos_token=EOS, chat_template=CHATML
    )
    torch.manual_seed(0)
    # The head of a base with the default init (std 0.02) caps every logit near 1.3 after the
    # final norm: a frozen head could never say anything with confidence. 0.2 gives a base
    # whose head can, as a pretrained one's does.
    init = {"initializer_range": 0.2} if tuning == "lora" else {}
    config = transformers.LlamaConfig(
        **SHAPE, vocab_size=len(fast), tie_word_embeddings=False, **init
    )
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
        *TUNING[tuning],
        "--train.warmup_steps=2",
        "--train.val_every=0",
        "--metrics.log_every=1",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
        "--parallel.dp_shard=2",
        f"--checkpoint.initial={ckpt}",
        "--checkpoint.hf=final",
        *(f"--{k.replace('__', '.')}={v}" for k, v in DOC_MASK.items()),
        *overrides,
        timeout=600,
    )
    trained = losses(run)
    last = max(trained)
    assert sorted(trained) == list(range(1, last + 1)), trained
    assert trained[last] < 0.3 * trained[1], trained

    (out,) = sorted(run.glob("checkpoints/*/hf"))[-1:]  # the final checkpoint's folder
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    if tuning == "lora":
        import peft

        base = transformers.LlamaForCausalLM.from_pretrained(str(hf))  # the frozen base
        model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    else:
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
