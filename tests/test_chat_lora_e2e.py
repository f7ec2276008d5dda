"""Chat LoRA fine-tuning through the CLI with nothing copied by hand: a Hugging Face folder ->
import-hf -> prepare --format chat --pack-seq-len -> launch 2 dp_shard processes with [lora]
and checkpoint.hf=final -> the run's own hf/ (PEFT adapter + tokenizer) -> peft on the original
folder and `triaxis generate` give the same greedy reply, the one the chat set taught."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import transformers

from tests.helpers import TINY_LLAMA, losses, triaxis
from tests.test_chat import BOS, CHATML, DOC_MASK, END, EOS, WORDS, chat_tokenizer
from triaxis.checkpoint import manifest as mf

peft = pytest.importorskip("peft", reason="the test extra installs peft")
REPLY = "✓ fine-tune"


@pytest.mark.slow
def test_chat_lora_run_hf_folder_generates_the_taught_reply(tmp_path):
    hf, ckpt, data, run = (tmp_path / n for n in ("hf", "ckpt", "data", "run"))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=chat_tokenizer(), bos_token=BOS, eos_token=EOS, chat_template=CHATML
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA, vocab_size=len(fast), tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    fast.save_pretrained(hf)
    printed = triaxis("import-hf", hf, "--output", ckpt).stdout
    overrides = shlex.split(printed.split(f"--checkpoint.initial={ckpt}")[1].splitlines()[0])
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
        "prepare", "--input", chat, "--format", "chat", "--tokenizer", f"hf:{hf}",
        "--pack-seq-len", 64, "--output", data,
    )  # fmt: skip
    triaxis(
        "launch", "--nproc-per-node", 2, f"--data.path={data}", "--data.seq_len=64",
        f"--train.run_dir={run}", "--train.global_batch=8", "--train.micro_batch=2",
        "--train.steps=40", "--train.lr=1e-2", "--train.warmup_steps=2", "--train.val_every=0",
        "--metrics.log_every=1", "--metrics.progress=false", "--metrics.tensorboard=false",
        "--parallel.dp_shard=2", f"--checkpoint.initial={ckpt}", "--lora.enabled=true",
        "--lora.rank=8", "--lora.alpha=16",
        "--lora.targets=attention.w*,feed_forward.w1,feed_forward.w2,feed_forward.w3",
        "--checkpoint.hf=final", "--checkpoint.hf_dtype=fp32",
        *(f"--{k.replace('__', '.')}={v}" for k, v in DOC_MASK.items()), *overrides,
        timeout=600,
    )  # fmt: skip
    trained = losses(run)
    assert trained[40] < 0.3 * trained[1], trained

    out = mf.list_checkpoints(str(run / "checkpoints"))[-1].path + "/hf"
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the run's own tokenizer files
    base = transformers.LlamaForCausalLM.from_pretrained(str(hf))
    model = peft.PeftModel.from_pretrained(base, out).eval()
    question = [{"role": "user", "content": "token shard 999?"}]
    prompt = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    end_id = tok.convert_tokens_to_ids(END)
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=end_id,
            pad_token_id=end_id,
        )  # fmt: skip
    reply = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)
    assert reply.startswith(REPLY + END), reply
    n = len(tok(REPLY, add_special_tokens=False)["input_ids"])
    ours = triaxis(
        "generate", "--checkpoint", run, "--prompt", prompt, "--max-new-tokens", n,
        "--temperature", 0,
    ).stdout  # fmt: skip
    assert ours.rstrip("\n") == prompt + tok.decode(gen[0, ids.shape[1] : ids.shape[1] + n])
