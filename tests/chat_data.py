"""Chat data for the tests: chat templates, a Llama-like tokenizer folder, conversations of varied
lengths, `prepare --format chat` and readers of what it wrote, the bad-input matrix's chat
inputs, and a prepared chat set (the `chat_data` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_tokenizer_hf import BOS, EOS, WORDS, llama_like_tokenizer
from triaxis.config import DataConfig
from triaxis.data.prepare import PrepareOptions, prepare

# Conversations are packed with document masking where the trainer has it (data.document_mask,
# issue 16 item 2): each one attends only to itself.
DOC_MASK = {"data__document_mask": "true"} if hasattr(DataConfig, "document_mask") else {}
START, END = "<|im_start|>", "<|im_end|>"
CHATML = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, prefix-stable: assistant spans are found by rendering prefixes."""
MARKED = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The same text, with the assistant content marked by {% generation %}."""
UNSTABLE = "{{ messages | length }}" + CHATML
"""Renders the number of turns first: no conversation starts with its prefixes' rendering."""


def chat_tokenizer():
    tok = llama_like_tokenizer()
    tok.add_special_tokens([START, END])
    return tok


def tokenizer_folder(folder: Path, template: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    chat_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"eos_token": EOS, "bos_token": BOS}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def bad_input_workspace(root: Path) -> None:
    """The chat files and tokenizer folders of tests/test_bad_input.py's prepare rows."""
    tokenizer_folder(root / "chat_hf", CHATML)
    tokenizer_folder(root / "chat_hf_plain", None)
    tokenizer_folder(root / "chat_hf_unstable", UNSTABLE)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations "
    strict += "must start with the user') }}{% endif %}" + CHATML
    tokenizer_folder(root / "chat_hf_strict", strict)
    eot = tokenizer_folder(root / "chat_hf_eot", CHATML)
    (eot / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": END, "bos_token": BOS, "chat_template": CHATML})
    )
    good = json.dumps({"messages": conversation(1)})
    lines = {
        "chat_ok": [good],
        "chat_assistant_first": [
            json.dumps({"messages": [{"role": "assistant", "content": "a"}] + conversation(0)})
        ],
        "chat_badrole": [
            good,
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
        ],
        "chat_badjson": [good, '{"messages": [}'],
        "chat_nomessages": ['{"text": "a"}'],
        "chat_noassistant": ['{"messages": [{"role": "user", "content": "a"}]}'],
        "pc_types": ['{"prompt": 5, "completion": "x"}'],
        "pc_missing": ['{"prompt": "x"}'],
    }
    for name, rows in lines.items():
        (root / f"{name}.jsonl").write_text("\n".join(rows) + "\n")


def conversation(i: int) -> list[dict]:
    # Replies of words without edge whitespace: no token straddles a reply's first character
    # (one that does counts as a target: it overlaps the reply).
    w = [x for x in WORDS if x.strip()] * 2
    turns = [{"role": "user", "content": f"{w[i % 10]} {w[(i + 3) % 10]} {i}"}]
    if i % 3 == 0:
        turns.insert(0, {"role": "system", "content": "token shard"})
    turns.append({"role": "assistant", "content": " ".join(w[(i + j) % 10] for j in range(i % 5))})
    if i % 2:
        turns += [
            {"role": "user", "content": "fine-tune?"},
            {"role": "assistant", "content": f"✓ {w[i % 10]}"},
        ]
    return turns


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def run_prepare(inputs: Path, out: Path, folder: Path, fmt: str = "chat", **kw) -> dict:
    opts = dict(inputs=[str(inputs)], output=str(out), tokenizer=f"hf:{folder}", workers=1)
    return prepare(PrepareOptions(**{**opts, "format": fmt, **kw}), log=lambda *_: None)


def read(out: Path, manifest: dict, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    shards = manifest["splits"][split]["shards"]
    ids = np.concatenate([np.fromfile(out / s["file"], dtype=manifest["dtype"]) for s in shards])
    mask = np.concatenate([np.fromfile(out / s["mask_file"], dtype=np.uint8) for s in shards])
    return ids.astype(np.int64), mask


def documents(ids: np.ndarray, mask: np.ndarray, eos_id: int) -> list[tuple[list, list]]:
    ends = np.flatnonzero(ids == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [(ids[s : e + 1].tolist(), mask[s : e + 1].tolist()) for s, e in zip(starts, ends)]


def hf_reference(folder: Path, template: str):
    """transformers' own tokenizer over the folder: what the model sees at inference time."""
    import transformers

    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token=BOS,
        eos_token=EOS,
        chat_template=template,
    )


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> str:
    """A prepared chat set for training: varied lengths, so micro-batches hold varied numbers
    of assistant targets (a per-micro-batch mean would differ from the global one)."""
    root = tmp_path_factory.mktemp("chat_data")
    folder = tokenizer_folder(root / "hf", CHATML)
    src = write_jsonl(root / "chat.jsonl", [{"messages": conversation(i)} for i in range(400)])
    run_prepare(src, root / "out", folder, val_fraction=0.05)
    return str(root / "out")
