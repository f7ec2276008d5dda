"""Loss masks against the documented rules (docs/finetuning.md): in a conversational
prompt-completion only the completion is trained, never the prompt's own assistant turns; and the
end-of-sequence token that ends a trained completion is a target, also when the tokenizer's
post-processor is what appends it. Several real template styles, built locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chat_data import CHATML, MARKED, documents, read, run_prepare, write_jsonl
from tests.test_tokenizer_hf import BOS, EOS, llama_like_tokenizer

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + "
    "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
)
ZEPHYR_MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "chatml_marked": MARKED, "mistral": MISTRAL}
TEMPLATES["zephyr_marked"] = ZEPHYR_MARKED
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>"]
SPECIALS += ["<|eot_id|>", "</s>", "<|assistant|>", "<|user|>", "<|system|>"]
EARLIER, FINAL = "naïve 数据", "fine-tune ✓"


def folder_with(path: Path, template: str | None, post: str = "bos") -> Path:
    """A tokenizer folder; `post` is what the post-processor adds: bos, bos+eos or eos."""
    from tokenizers import processors

    tok = llama_like_tokenizer()
    tok.add_special_tokens(SPECIALS)
    single = {"bos": f"{BOS} $A", "bos+eos": f"{BOS} $A {EOS}", "eos": f"$A {EOS}"}[post]
    ids = [(t, tok.token_to_id(t)) for t in (BOS, EOS)]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=ids)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"eos_token": EOS, "bos_token": BOS}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def prompt(i: int) -> list[dict]:
    turns = [{"role": "user", "content": f"token {i}"}]
    turns += [{"role": "assistant", "content": EARLIER}, {"role": "user", "content": "shard?"}]
    return ([{"role": "system", "content": "def"}] if i % 2 else []) + turns


@pytest.mark.parametrize("style", list(TEMPLATES))
def test_prompt_assistant_turns_are_context_only(tmp_path, style):
    from tokenizers import Tokenizer

    folder = folder_with(tmp_path / "hf", TEMPLATES[style])
    rows = [{"prompt": prompt(0), "completion": [{"role": "assistant", "content": FINAL}]}]
    rows += [dict(rows[0], prompt=prompt(1))]
    src = write_jsonl(tmp_path / "pc.jsonl", rows)
    manifest = run_prepare(src, tmp_path / "out", folder, "prompt-completion", val_fraction=0)
    ids, mask = read(tmp_path / "out", manifest)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    docs = documents(ids, mask, manifest["tokenizer"]["eos_id"])
    assert len(docs) == len(rows)
    for doc_ids, doc_mask in docs:
        counted = tok.decode([t for t, m in zip(doc_ids, doc_mask) if m])
        context = tok.decode([t for t, m in zip(doc_ids, doc_mask) if not m])
        assert FINAL in counted and EARLIER not in counted, (style, counted)
        assert EARLIER in context
        # Trained: the completion, its end of turn (as the template writes it), the final EOS.
        assert counted.count(FINAL) == 1 and doc_mask[-1] == 1, (style, doc_mask)

    # The same conversation as --format chat trains both assistant turns.
    chat = [{"messages": r["prompt"] + r["completion"]} for r in rows]
    m2 = run_prepare(write_jsonl(tmp_path / "c.jsonl", chat), tmp_path / "o2", folder, "chat")
    ids2, mask2 = read(tmp_path / "o2", m2, "train")
    counted = tok.decode([t for t, m in zip(ids2.tolist(), mask2) if m])
    assert EARLIER in counted and FINAL in counted


@pytest.mark.parametrize("post", ["bos", "bos+eos", "eos"])
def test_end_of_completion_is_a_target_whoever_appends_it(tmp_path, post):
    folder = folder_with(tmp_path / "hf", None, post)
    rows = [{"prompt": f"def {i} ", "completion": "return ✓"} for i in range(4)]
    src = write_jsonl(tmp_path / "pc.jsonl", rows)
    manifest = run_prepare(src, tmp_path / "out", folder, "prompt-completion", val_fraction=0)
    ids, mask = read(tmp_path / "out", manifest)
    eos_id = manifest["tokenizer"]["eos_id"]
    docs = documents(ids, mask, eos_id)
    assert len(docs) == len(rows)
    for doc_ids, doc_mask in docs:
        assert doc_ids.count(eos_id) == 1 and doc_ids[-1] == eos_id
        assert doc_mask[-1] == 1, (post, doc_ids, doc_mask)  # the model learns to stop
        assert doc_mask[0] == 0


@pytest.mark.parametrize("style", list(TEMPLATES))
def test_every_template_style_trains_the_final_end_of_document(tmp_path, style):
    """--format chat with each style and an EOS-appending post-processor (not applied to
    template text): one EOS per conversation, a target; BOS and user turns are context."""
    folder = folder_with(tmp_path / "hf", TEMPLATES[style], "bos+eos")
    convs = [prompt(i) + [{"role": "assistant", "content": FINAL}] for i in range(3)]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    manifest = run_prepare(src, tmp_path / "out", folder, "chat", val_fraction=0)
    ids, mask = read(tmp_path / "out", manifest)
    eos_id = manifest["tokenizer"]["eos_id"]
    docs = documents(ids, mask, eos_id)
    assert len(docs) == len(convs)
    for doc_ids, doc_mask in docs:
        assert doc_ids.count(eos_id) == 1 and doc_mask[-1] == 1 and doc_mask[0] == 0
