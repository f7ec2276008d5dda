"""Instruction data for `triaxis prepare --format chat | prompt-completion`, with a loss mask.

Inputs are JSON Lines (or one JSON array), one example a line:
    chat               {"messages": [{"role": "user", "content": "..."}, {"role": ...}, ...]}
    prompt-completion  {"prompt": "...", "completion": "..."}  (plain text: prompt + completion),
                       or both lists of messages (rendered like chat; the completion's count)

A chat is rendered to text by the model's own chat template (`--tokenizer hf:PATH`: the
`chat_template.jinja` or `tokenizer_config.json` of its folder), with transformers' renderer, so
the text is exactly what `tokenizer.apply_chat_template` gives. What the model learns to say are
the characters of the assistant turns:
- templates that mark them with `{% generation %}` ... `{% endgeneration %}` say so themselves;
- otherwise each assistant turn k is the text that rendering messages[:k + 1] adds to rendering
  messages[:k] with the generation prompt (the assistant header): its content and its
  end-of-turn token. That needs a template whose rendering of a conversation starts with the
  rendering of each of its prefixes; one that is not (it rewrites earlier turns once later ones
  follow) is refused with a one-line error rather than trained with a wrong mask.
The whole text is then tokenized at once (as the tokenizer tokenizes it at inference time) and
every token overlapping an assistant character is a target the loss counts (mask 1); every other
token is context only (mask 0, a target of -100 in training). Each example is one document,
ended by the end-of-document token (appended unless the template already ended with it;
counted when the example ends with an assistant turn, so the model learns to stop).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import numpy as np

from triaxis import storage
from triaxis.errors import UserError

FORMATS = ("text", "chat", "prompt-completion")
ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
"""The special tokens a template may use by name (transformers passes them all)."""
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class Example:
    """One rendered example: its text, the [start, end) character spans the loss counts, whether
    the tokenizer's own special tokens are added (plain text) or the template wrote them, and
    whether it ends with an assistant turn (then its end-of-document token counts too)."""

    __slots__ = ("text", "spans", "add_special", "ends_trained", "where")

    def __init__(self, text, spans, add_special, ends_trained, where):
        self.text, self.spans, self.add_special = text, spans, add_special
        self.ends_trained, self.where = ends_trained, where

    def __len__(self) -> int:  # characters: what a chunk of work is measured in
        return len(self.text)


class ChatTemplate:
    """The chat template of an hf:PATH tokenizer folder, rendered as transformers renders it."""

    @classmethod
    def load(cls, folder: str, what: str, required: bool) -> ChatTemplate | None:
        """The folder's template; without one, a UserError if `required`, else None."""
        config = _read_json(storage.join(folder, "tokenizer_config.json"), what)
        jinja = storage.join(folder, TEMPLATE_FILE)
        if storage.exists(jinja):
            template = storage.read_bytes(jinja).decode()
        else:
            template = config.get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
        if not isinstance(template, str) or not template.strip():
            if not required:
                return None
            raise UserError(
                f"{what}: no chat template ({TEMPLATE_FILE}, or chat_template in "
                f"tokenizer_config.json) in {folder}; use the folder of a chat (-Instruct) "
                "model, or --format prompt-completion with plain-text prompts"
            )
        try:
            return cls(template, config, what)
        except UserError:
            if required:
                raise
            return None  # plain-text prompt-completion renders nothing: no transformers needed

    def __init__(self, template: str, config: dict, what: str):
        self.what = what
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise UserError(
                f"{what}: rendering a chat template needs transformers >= 4.51 "
                "(its chat-template renderer); pip install 'transformers>=4.51'"
            ) from None
        self.render_fn = render_jinja_template
        self.template = template
        self.marked = bool(_GENERATION.search(template))
        self.special = {}
        for key in _SPECIAL_KEYS:
            value = config.get(key)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str):
                self.special[key] = value

    def render(self, messages: list[dict], generation_prompt: bool, where: str):
        """(text, assistant character spans from {% generation %} markers)."""
        try:
            texts, spans = self.render_fn(
                conversations=[messages],
                chat_template=self.template,
                return_assistant_tokens_mask=self.marked,
                add_generation_prompt=generation_prompt,
                **self.special,
            )
        except Exception as e:  # noqa: BLE001  (the template is code: it raises anything)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"{where}: the chat template of {self.what} fails on this conversation "
                f"({msg}); fix the messages to the roles and order the model expects"
            ) from None
        return texts[0], [tuple(s) for s in (spans[0] if spans else [])]

    def example(self, messages: list[dict], where: str, first: int = 0) -> Example:
        """The rendered conversation; only assistant turns at index >= `first` are trained (a
        conversational prompt's own assistant turns are context, not targets)."""
        text, spans = self.render(messages, False, where)
        turns = sum(m["role"] == "assistant" for m in messages)
        if not self.marked or len(spans) != turns:
            # Without markers, or markers that do not pair one-to-one with assistant turns:
            # one span per assistant turn, found by rendering prefixes.
            spans = self._prefix_spans(messages, text, where)
        spans = spans[sum(m["role"] == "assistant" for m in messages[:first]) :]
        ends = messages[-1]["role"] == "assistant"
        return Example(text, spans, False, ends, where)

    def _prefix_spans(self, messages: list[dict], full: str, where: str) -> list:
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], True, where)[0]
            upto = self.render(messages[: k + 1], False, where)[0]
            if not (upto.startswith(before) and full.startswith(upto)):
                raise UserError(
                    f"{where}: the chat template of {self.what} renders earlier turns "
                    f"differently once later ones follow (assistant turn {k} is not a "
                    "prefix of the whole), so its assistant tokens cannot be found by "
                    "rendering prefixes; add {% generation %}...{% endgeneration %} "
                    "around the assistant content in the template"
                )
            spans.append((len(before), len(upto)))
        return spans


def _read_json(path: str, what: str) -> dict:
    if not storage.exists(path):
        return {}
    try:
        config = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: {path} is not valid JSON ({e}); fix or replace it") from None
    return config if isinstance(config, dict) else {}


def _messages(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(
            f"{where}: {field!r} is {type(value).__name__ if value != [] else 'empty'}, not a "
            'non-empty list of messages like [{"role": "user", "content": "..."}]'
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(
                f"{where}: message {i} of {field!r} has no string 'content'; each message "
                'is {"role": ..., "content": "..."}'
            )
        role = m.get("role")
        if role not in ROLES:
            raise UserError(
                f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)} "
                "(rename it, e.g. 'bot' -> 'assistant', 'human' -> 'user')"
            )
        out.append(dict(m))  # other keys (name, tool_calls, ...) are the template's to use
    return out


def parse_example(obj, fmt: str, where: str, template: ChatTemplate | None) -> Example:
    """One input record -> an Example; every problem is one UserError naming `where`."""
    if fmt == "chat":
        if not isinstance(obj, dict) or "messages" not in obj:
            raise UserError(
                f"{where} has no 'messages' field; --format chat needs one object per "
                'line like {"messages": [{"role": "user", "content": "..."}, ...]}'
            )
        messages = _messages(obj["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(
                f"{where}: no assistant message, so nothing to train on; add the "
                "assistant's reply or drop the line"
            )
        assert template is not None
        return template.example(messages, where)
    if not isinstance(obj, dict) or "prompt" not in obj or "completion" not in obj:
        raise UserError(
            f"{where} lacks 'prompt' or 'completion'; --format prompt-completion needs one "
            'object per line like {"prompt": "...", "completion": "..."}'
        )
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        text = prompt + completion
        return Example(text, [(len(prompt), len(text))], True, True, where)
    if isinstance(prompt, list) and isinstance(completion, list):
        head = _messages(prompt, where, "prompt")
        messages = head + _messages(completion, where, "completion")
        if any(m["role"] != "assistant" for m in messages[len(prompt) :]):
            raise UserError(
                f"{where}: the completion holds a message whose role is not assistant; "
                "move it into the prompt"
            )
        if template is None:
            raise UserError(
                f"{where}: conversational prompt-completion needs a chat template; "
                "pass --tokenizer hf:PATH of a chat model"
            )
        return template.example(messages, where, first=len(head))
    raise UserError(
        f"{where}: 'prompt' is a {type(prompt).__name__} and 'completion' a "
        f"{type(completion).__name__}; give two strings, or two lists of messages"
    )


def iter_examples(
    files: list[str], fmt: str, template, max_bytes: int, count=None
) -> Iterator[Example]:
    """The examples of JSON Lines files in order, stopping after the one that brings the total
    past `max_bytes` characters of rendered text (0 = no limit). With `count` (an InputCount),
    the rest is still read, to count what the limit left unread."""
    from triaxis.data.sources import json_records

    total = 0
    for path in files:
        for obj, where in json_records(path, fmt):
            ex = parse_example(obj, fmt, where, template)
            if max_bytes and total >= max_bytes:
                if count is None:
                    return
                count.unread_docs += 1
                count.unread_chars += len(ex.text)
                continue
            if count is not None:
                count.docs += 1
                count.chars += len(ex.text)
            yield ex
            total += len(ex.text)


def token_mask(offsets, spans) -> np.ndarray:
    """1 for each token whose [start, end) characters overlap an assistant span."""
    mask = np.zeros(len(offsets), np.uint8)
    if not spans or not len(offsets):
        return mask
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    for s, e in spans:
        mask |= ((off[:, 0] < e) & (off[:, 1] > s)).astype(np.uint8)
    return mask


def encode_example(tok, ex: Example, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(token ids ending in the end-of-document token, loss mask) of one example."""
    enc = tok.tok.encode(ex.text, add_special_tokens=ex.add_special)
    ids = np.asarray(enc.ids, dtype=dtype)
    mask = token_mask(enc.offsets, ex.spans)
    if not ids.size or int(ids[-1]) != tok.eos_id:
        ids = np.append(ids, np.asarray(tok.eos_id, dtype))
        mask = np.append(mask, np.uint8(ex.ends_trained))
    elif ex.ends_trained and enc.offsets[-1][1] <= enc.offsets[-1][0]:
        # An end token the post-processor appended (no characters of the text): it ends the
        # trained turn, so the model learns to stop.
        mask[-1] = 1
    inside = np.flatnonzero(ids[:-1] == tok.eos_id)
    if inside.size:
        raise UserError(
            f"{ex.where}: the end-of-document token {tok.eos_token!r} occurs inside the "
            f"example (token {int(inside[0])} of {ids.size}): the chat template ends turns "
            "with it, and packed documents are cut at it; pass --eos-token with a special "
            "token the template does not use (e.g. '<|end_of_text|>' or '<|endoftext|>')"
        )
    return ids, mask
