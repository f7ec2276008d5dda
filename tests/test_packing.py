"""Whole-example packing (`prepare --pack-seq-len`, data/packing.py): every example whole in one
window, padding never trained, the efficiency reported, overlong examples handled by the
chosen policy, and a packed run that resumes into another data-parallel size."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.chat_data import (
    CHATML,
    conversation,
    documents,
    read,
    run_prepare,
    tokenizer_folder,
    write_jsonl,
)
from tests.dist import run_workers
from tests.parity import train_collect
from triaxis.data.dataset import TokenDataset, inputs_targets
from triaxis.data.prepare import PrepareOptions, prepare
from triaxis.errors import UserError
from triaxis.model.loss import IGNORE_INDEX

PACK = 128


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict:
    """The same conversations prepared as the concatenated stream and packed."""
    root = tmp_path_factory.mktemp("packing")
    folder = tokenizer_folder(root / "hf", CHATML)
    src = write_jsonl(root / "chat.jsonl", [{"messages": conversation(i)} for i in range(300)])
    plain = run_prepare(src, root / "plain", folder, val_fraction=0.05)
    packed = run_prepare(src, root / "packed", folder, val_fraction=0.05, pack_seq_len=PACK)
    return {"root": root, "src": src, "folder": folder, "plain": plain, "packed": packed}


def window_segments(ds: TokenDataset, eos_id: int) -> list[list[tuple[tuple, tuple]]]:
    """Each window's documents (ids, loss mask), cut after each end-of-document token; padding
    (a lone end-of-document token with mask 0) left out."""
    out = []
    for w in range(ds.num_windows):
        ids = ds.sample(w, shuffle=False).astype(np.int64)
        mask = ds._tokens(w * ds.stride, ds.seq_len + 1, mask=True)
        segs = []
        for d_ids, d_mask in documents(ids, mask, eos_id):
            if not (len(d_ids) == 1 and d_mask == [0]):
                segs.append((tuple(d_ids), tuple(d_mask)))
        out.append(segs)
    return out


def whole_examples(ds: TokenDataset, examples: Counter, eos_id: int) -> bool:
    """Whether every window holds only whole examples, each example in exactly one."""
    seen: Counter = Counter()
    for segs in window_segments(ds, eos_id):
        seen.update(segs)
    return seen == examples


def test_every_target_is_trained_with_its_whole_prompt_and_padding_never(chat):
    root, plain, packed = chat["root"], chat["plain"], chat["packed"]
    eos = packed["tokenizer"]["eos_id"]
    ids, mask = read(root / "plain", plain)
    examples = Counter((tuple(i), tuple(m)) for i, m in documents(ids, mask, eos))
    ds = TokenDataset(root / "packed", "train", PACK)
    assert ds.num_windows == packed["splits"]["train"]["tokens"] // (PACK + 1)
    assert whole_examples(ds, examples, eos)
    # The check can fail: the concatenated stream cuts examples at window edges.
    assert not whole_examples(TokenDataset(root / "plain", "train", PACK), examples, eos)
    # Padding is masked: the valid targets are exactly the examples' targets (no example starts
    # with a target, so none is lost at a window's first token).
    _, targets = ds.inputs_targets(0, ds.num_windows, shuffle=False)
    assert int((targets != IGNORE_INDEX).sum()) == plain["splits"]["train"]["target_tokens"]
    info = packed["splits"]["train"]["packing"]
    assert info["truncated"] == info["dropped"] == 0
    assert info["real_tokens"] == plain["splits"]["train"]["tokens"]
    assert packed["packing"] == {"seq_len": PACK, "overlong": "truncate"}


def test_packed_data_refuses_another_seq_len(chat):
    with pytest.raises(UserError, match=f"packed for seq_len {PACK}") as e:
        TokenDataset(chat["root"] / "packed", "train", 32)
    assert "\n" not in str(e.value)


def mixed_documents(path: Path, n: int = 400) -> Path:
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    return write_jsonl(path, [{"text": d} for d in docs])


def prepare_text(src: Path, out: Path, **kw) -> tuple[dict, list[str]]:
    lines: list[str] = []
    opts = dict(inputs=[str(src)], output=str(out), tokenizer="byte", workers=1)
    manifest = prepare(PrepareOptions(**{**opts, "val_fraction": 0, **kw}), log=lines.append)
    return manifest, lines


def test_plain_text_packs_whole_documents_at_over_90_percent(tmp_path):
    src = mixed_documents(tmp_path / "docs.jsonl")
    plain, _ = prepare_text(src, tmp_path / "plain")
    manifest, lines = prepare_text(src, tmp_path / "packed", pack_seq_len=512)
    info = manifest["splits"]["train"]["packing"]
    assert info["efficiency"] >= 0.9, info
    assert info["truncated"] == info["dropped"] == 0
    assert info["real_tokens"] == plain["splits"]["train"]["tokens"]
    assert any(f"efficiency {info['efficiency']:.1%}" in line for line in lines), lines
    eos = manifest["tokenizer"]["eos_id"]
    ids = np.fromfile(tmp_path / "plain" / "train_00000.bin", dtype=plain["dtype"])
    examples = Counter(
        (tuple(i), tuple([1] * len(i))) for i, _ in documents(ids, np.ones(ids.size, int), eos)
    )
    assert whole_examples(TokenDataset(tmp_path / "packed", "train", 512), examples, eos)


def test_overlong_examples_are_truncated_dropped_or_refused(tmp_path):
    src = mixed_documents(tmp_path / "docs.jsonl", 50)
    longest = max(len(json.loads(line)["text"]) for line in src.open()) + 1  # + its end token
    assert longest > 200  # some of the documents do not fit 199 + 1 tokens
    truncated, lines = prepare_text(src, tmp_path / "t", pack_seq_len=199)
    dropped, _ = prepare_text(src, tmp_path / "d", pack_seq_len=199, overlong="drop")
    t, d = truncated["splits"]["train"]["packing"], dropped["splits"]["train"]["packing"]
    assert t["truncated"] == d["dropped"] > 0 and t["dropped"] == d["truncated"] == 0
    assert t["examples"] == d["examples"] + d["dropped"]
    assert any(f"{t['truncated']} truncated" in line for line in lines)
    ds = TokenDataset(tmp_path / "t", "train", 199)
    assert ds.num_tokens == ds.num_windows * 200
    with pytest.raises(UserError, match="longer than a packed window") as e:
        prepare_text(src, tmp_path / "e", pack_seq_len=199, overlong="error")
    assert "\n" not in str(e.value) and not (tmp_path / "e").exists()
    with pytest.raises(UserError, match="--overlong 'split' is unknown"):
        prepare_text(src, tmp_path / "x", pack_seq_len=199, overlong="split")
    assert not (tmp_path / "x").exists()


def test_packed_run_resumed_at_another_dp_size_equals_the_uninterrupted_run(chat, tmp_path):
    """Steps 1-2 under dp_shard=2, 3-4 in one process: the losses equal one uninterrupted
    single-process run (the cursor, one integer, means the same samples in both layouts)."""
    data = str(chat["root"] / "packed")
    common = {"data__seq_len": PACK, "train__steps": 4, "data__document_mask": "true"}
    ref = train_collect(0, 1, data, str(tmp_path / "ref"), {**common, "train__micro_batch": 8})
    ckpt = {"checkpoint__dir": str(tmp_path / "ckpt"), "checkpoint__interval": 2}
    degrees = {"parallel__dp_shard": 2, "train__micro_batch": 4, "train__exit_after_steps": 2}
    first = run_workers(
        train_collect, 2, data, str(tmp_path / "run"), {**common, **ckpt, **degrees}
    )[0]
    second = train_collect(
        0, 1, data, str(tmp_path / "run"), {**common, **ckpt, "train__micro_batch": 8}
    )
    assert sorted(first["losses"]) == [1, 2] and sorted(second["losses"]) == [3, 4]
    got = {**first["losses"], **second["losses"]}
    for step, want in ref["losses"].items():
        assert abs(got[step] - want) <= 1e-5 * abs(want), (step, got[step], want)


def test_a_mixture_of_packed_and_unpacked_sources_reads_each_sources_windows(chat):
    """A mixture samples a packed source by its own windows and masks (the mixture only maps a
    global index to (source, index)): each row equals that source's sample, padding ignored."""
    from triaxis.data.mixture import MixtureDataset

    root = chat["root"]
    packed = TokenDataset(root / "packed", "train", PACK)
    plain = TokenDataset(root / "plain", "train", PACK)
    mix = MixtureDataset([packed, plain], [0.5, 0.5], ["packed", "plain"], [None, None])
    inputs, targets = inputs_targets(mix, 0, 16)
    sources = set()
    for row, i in enumerate(range(16)):
        src, k = mix.locate(i)
        ds = mix.sources[src] if not isinstance(src, TokenDataset) else src
        sources.add(id(ds))
        want_in, want_t = ds.inputs_targets(k, 1)
        assert inputs[row].tolist() == want_in[0].tolist()
        assert targets[row].tolist() == want_t[0].tolist()
    assert sources == {id(packed), id(plain)}
