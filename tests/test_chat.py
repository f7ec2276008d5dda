"""Instruction / chat fine-tuning: `prepare --format chat | prompt-completion` renders with the
model's own chat template and writes a loss mask (only assistant / completion tokens count), the
dataset turns masked targets into -100, and every loss path skips them with the mean taken over
the valid targets of the whole global batch, so a sharded run gives one process's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.chat_data import (
    CHATML,
    DOC_MASK,
    END,
    MARKED,
    chat_data,  # noqa: F401  (fixture)
    chat_tokenizer,
    conversation,
    documents,
    hf_reference,
    read,
    run_prepare,
    tokenizer_folder,
    write_jsonl,
)
from tests.dist import run_workers
from tests.parity import assert_same_run, train_collect
from tests.test_tokenizer_hf import EOS, WORDS
from triaxis.data.dataset import TokenDataset, has_loss_mask, inputs_targets
from triaxis.data.encode import CHUNK_DOCS
from triaxis.data.prepare import PrepareOptions, prepare
from triaxis.errors import UserError
from triaxis.model.loss import IGNORE_INDEX, chunked_cross_entropy


@pytest.mark.parametrize("template", [CHATML, MARKED], ids=["prefix_renders", "generation_tags"])
def test_chat_tokens_are_the_templates_and_only_assistant_turns_count(tmp_path, template):
    folder = tokenizer_folder(tmp_path / "hf", template)
    convs = [conversation(i) for i in range(12)]
    src = write_jsonl(tmp_path / "in" / "chat.jsonl", [{"messages": c} for c in convs])
    manifest = run_prepare(src, tmp_path / "out", folder, val_fraction=0)
    assert manifest["loss_mask"] == {"dtype": "uint8", "suffix": ".mask"}
    assert manifest["input_format"] == "chat"
    ids, mask = read(tmp_path / "out", manifest)
    eos_id = manifest["tokenizer"]["eos_id"]
    docs = documents(ids, mask, eos_id)
    assert len(docs) == len(convs) and manifest["splits"]["train"]["documents"] == len(convs)
    assert manifest["splits"]["train"]["target_tokens"] == int(mask.sum())

    hf = hf_reference(folder, template)
    end_id = hf.convert_tokens_to_ids(END)
    for conv, (doc_ids, doc_mask) in zip(convs, docs):
        text = hf.apply_chat_template(conv, tokenize=False)
        # The template's text tokenized as apply_chat_template tokenizes it, then one EOS.
        assert doc_ids == hf(text, add_special_tokens=False)["input_ids"] + [eos_id]
        # What counts: each assistant reply, its end-of-turn (+ the newline after it with the
        # prefix renders, which cover up to the next turn) and the final EOS.
        counted = hf.decode([t for t, m in zip(doc_ids, doc_mask) if m])
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        sep = END + ("\n" if template == CHATML else "")
        assert counted == "".join(r + sep for r in replies) + EOS, counted
        assert doc_mask[-1] == 1 and doc_ids.count(end_id) == len(conv)
        assert doc_mask[0] == 0  # BOS, headers, user and system turns are context only


def test_generation_tags_agree_with_transformers_assistant_mask(tmp_path):
    """With {% generation %} tags, the mask is transformers' return_assistant_tokens_mask."""
    folder = tokenizer_folder(tmp_path / "hf", MARKED)
    convs = [conversation(i) for i in range(6)]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    manifest = run_prepare(src, tmp_path / "out", folder, val_fraction=0)
    ids, mask = read(tmp_path / "out", manifest)
    hf = hf_reference(folder, MARKED)
    docs = documents(ids, mask, manifest["tokenizer"]["eos_id"])
    for conv, (doc_ids, doc_mask) in zip(convs, docs):
        ref = hf.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert doc_ids[:-1] == list(ref["input_ids"])
        assert doc_mask[:-1] == list(ref["assistant_masks"])


def test_prompt_completion_counts_the_completion_and_its_end(tmp_path):
    folder = tokenizer_folder(tmp_path / "hf", None)  # plain text: no template needed
    rows = [{"prompt": f"def {WORDS[i % 10]} ", "completion": f"return ✓ {i}"} for i in range(8)]
    src = write_jsonl(tmp_path / "pc.jsonl", rows)
    manifest = run_prepare(src, tmp_path / "out", folder, "prompt-completion", val_fraction=0)
    ids, mask = read(tmp_path / "out", manifest)
    tok = chat_tokenizer()
    eos_id = tok.token_to_id(EOS)
    for row, (doc_ids, doc_mask) in zip(rows, documents(ids, mask, eos_id)):
        whole = tok.encode(row["prompt"] + row["completion"])  # BOS from the post-processor
        assert doc_ids == whole.ids + [eos_id]
        counted = tok.decode([t for t, m in zip(doc_ids, doc_mask) if m])
        assert counted.strip() == row["completion"].strip()
        assert doc_mask[0] == 0 and doc_mask[-1] == 1
        assert tok.decode([t for t, m in zip(doc_ids, doc_mask) if not m]).strip() == (
            row["prompt"].strip()
        )


def test_workers_give_identical_tokens_and_masks(tmp_path):
    folder = tokenizer_folder(tmp_path / "hf", CHATML)
    rows = [{"messages": conversation(i)} for i in range(CHUNK_DOCS + 40)]  # two chunks
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    outs = {}
    for w in (1, 2):
        outs[w] = run_prepare(src, tmp_path / f"o{w}", folder, workers=w, shard_tokens=3000)
    assert outs[1] == outs[2] and len(outs[1]["splits"]["train"]["shards"]) > 1
    for s in outs[1]["splits"]["train"]["shards"]:
        for key in ("file", "mask_file"):
            a, b = (tmp_path / f"o{w}" / s[key] for w in (1, 2))
            assert a.read_bytes() == b.read_bytes()


def test_prepare_again_replaces_its_masks_and_refuses_foreign_ones(tmp_path):
    folder = tokenizer_folder(tmp_path / "hf", CHATML)
    src = write_jsonl(tmp_path / "a.jsonl", [{"messages": conversation(i)} for i in range(60)])
    first = run_prepare(src, tmp_path / "out", folder, shard_tokens=500, val_fraction=0)
    assert len(first["splits"]["train"]["shards"]) > 2
    small = write_jsonl(tmp_path / "b.jsonl", [{"messages": conversation(1)}])
    run_prepare(small, tmp_path / "out", folder, shard_tokens=500, val_fraction=0)
    assert sorted(p.name for p in (tmp_path / "out").glob("train_*")) == [
        "train_00000.bin",
        "train_00000.mask",
    ]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "val_00000.mask").write_bytes(b"\x01")
    with pytest.raises(UserError, match="val_00000.mask"):
        run_prepare(small, tmp_path / "other", folder)
    assert (tmp_path / "other" / "val_00000.mask").read_bytes() == b"\x01"


def test_dataset_targets_are_ignored_exactly_where_the_mask_is_zero(chat_data):
    ds = TokenDataset(chat_data, "train", 32)
    inputs, targets = ds.inputs_targets(5, 4)
    tokens = ds.batch(5, 4)
    assert torch.equal(inputs, tokens[:, :-1])
    for row in range(4):
        w = ds.window_of(5 + row)
        mask = ds._tokens(w * 32 + 1, 32, mask=True)
        expect = torch.where(torch.from_numpy(mask == 1), tokens[row, 1:], IGNORE_INDEX)
        assert torch.equal(targets[row], expect)
    assert (targets == IGNORE_INDEX).any() and (targets != IGNORE_INDEX).any()


class _Mixture:
    """What the trainer's reader needs of a mixture (data/mixture.py): batch, sources, locate."""

    def __init__(self, sources):
        self.sources = sources

    def locate(self, i: int) -> tuple[int, int]:
        return i % 2, i // 2 + 3

    def batch(self, start: int, count: int, shuffle: bool = True):
        rows = [self.sources[s].sample(k) for s, k in map(self.locate, range(start, start + count))]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def test_a_mixture_takes_each_samples_mask_from_its_source(chat_data):
    chat = TokenDataset(chat_data, "train", 32)
    plain = TokenDataset(chat_data, "train", 32)
    plain.has_loss_mask = False  # a source prepared without --format chat
    mix = _Mixture([chat, plain])
    assert has_loss_mask(mix) and not has_loss_mask(_Mixture([plain, plain]))
    inputs, targets = inputs_targets(mix, 4, 6)
    for row, i in enumerate(range(4, 10)):
        s, k = mix.locate(i)
        want = mix.sources[s].inputs_targets(k, 1)
        assert torch.equal(inputs[row], want[0][0]) and torch.equal(targets[row], want[1][0])
    assert (targets[0::2] == IGNORE_INDEX).any() and not (targets[1::2] == IGNORE_INDEX).any()


def test_s3_template_and_masks_read_like_local(tmp_path, moto_s3):  # noqa: F811
    """hf:s3://... with its chat template, output to s3://, read back through the shard cache:
    the same tokens, masks and targets as the local preparation."""
    bucket = moto_s3.new_bucket()
    folder = tokenizer_folder(tmp_path / "hf", CHATML)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        moto_s3.put(f"s3://{bucket}/tok/{name}", (folder / name).read_bytes())
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(60)])
    local = run_prepare(src, tmp_path / "out", folder, shard_tokens=700)
    remote = prepare(
        PrepareOptions(
            inputs=[str(src)],
            output=f"s3://{bucket}/data",
            tokenizer=f"hf:s3://{bucket}/tok",
            format="chat",
            workers=1,
            shard_tokens=700,
        ),
        log=lambda *_: None,
    )
    assert remote["splits"] == local["splits"]
    a = TokenDataset(tmp_path / "out", "train", 32)
    b = TokenDataset(f"s3://{bucket}/data", "train", 32, cache_dir=str(tmp_path / "cache"))
    b.prefetch(0, 8)
    for x, y in zip(a.inputs_targets(0, 8), b.inputs_targets(0, 8)):
        assert torch.equal(x, y)
    b.close()


def test_damaged_mask_is_refused(chat_data, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("TRIAXIS_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "data"
    shutil.copytree(chat_data, copy)
    mask = copy / "train_00000.mask"
    raw = bytearray(mask.read_bytes())
    raw[3] ^= 1  # still 0/1 values: only the sha256 can tell
    mask.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="train_00000.mask fails its sha256"):
        TokenDataset(copy, "train", 32)
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        TokenDataset(copy, "train", 32, verify="size")


def test_masked_prompt_labels_change_no_loss_and_no_gradient():
    """The mask zeroes prompt targets: whatever labels the prompt positions would have, the
    loss and every gradient are those of the assistant targets alone, on both the fused
    chunked loss and the plain one; changing an assistant label does change them (control)."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = 40, 16, 50
    h0 = torch.randn(n, d, generator=gen)
    w0 = torch.randn(v, d, generator=gen) * 0.3
    labels = torch.randint(0, v, (n,), generator=gen)
    keep = torch.rand(n, generator=gen) < 0.4
    keep[:3] = True

    def grads(lab: torch.Tensor, fused: bool):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        targets = torch.where(keep, lab, IGNORE_INDEX)
        if fused:
            loss = chunked_cross_entropy(h, w, targets, chunk=7)
        else:
            loss = F.cross_entropy(h @ w.T, targets)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    # The reference: per-token losses of every label, weighted by the mask.
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    per_token = F.cross_entropy(h @ w.T, labels, reduction="none")
    ref_loss = (per_token * keep).sum() / keep.sum()
    ref_loss.backward()

    perturbed = torch.where(keep, labels, torch.randint(0, v, (n,), generator=gen))
    assert not torch.equal(perturbed, labels)
    control = labels.clone()
    control[0] = (control[0] + 1) % v
    for fused in (True, False):
        base = grads(labels, fused)
        for a, b in zip(base, (ref_loss.detach(), h.grad, w.grad)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads(perturbed, fused), base):
            assert torch.equal(a, b)
        changed = grads(control, fused)
        assert not torch.allclose(changed[0], base[0])
        assert not torch.allclose(changed[2], base[2])
        assert float(base[1][~keep].abs().max()) == 0.0  # an ignored row's own term


def test_all_targets_ignored_gives_zero_not_nan():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss = chunked_cross_entropy(h, w, torch.full((5,), IGNORE_INDEX), chunk=2)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(h.grad.abs().sum()) == 0.0


MASKED_LAYOUTS = {
    "dp_shard2_accum2": (2, {"parallel__dp_shard": 2, "train__micro_batch": 2}),
    "dp_shard2_full_logits": (
        2,
        {"parallel__dp_shard": 2, "train__micro_batch": 4, "train__loss_chunk_tokens": 0},
    ),
}


@pytest.mark.parametrize("layout", list(MASKED_LAYOUTS))
def test_masked_loss_under_dp_shard_matches_one_process(layout, chat_data, tmp_path):
    world, degrees = MASKED_LAYOUTS[layout]
    ref_overrides = {**DOC_MASK, "train__micro_batch": 8}
    ref = train_collect(0, 1, chat_data, str(tmp_path / "ref"), ref_overrides)
    got = run_workers(
        train_collect, world, chat_data, str(tmp_path / "run"), {**DOC_MASK, **degrees}
    )
    assert_same_run(got[0], ref)


def _val_losses(rank: int, world: int, data: str, run_dir: str, overrides: dict) -> dict:
    from tests.parity import make_config
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    cfg = make_config(data, run_dir, **overrides)
    return Trainer(cfg, init_distributed("cpu")).fit().val_losses


def test_masked_validation_loss_under_dp_shard_matches_one_process(chat_data, tmp_path):
    """Validation takes the same global mean over the valid targets (val_batches x global
    batch, in order): its value does not depend on the layout."""
    common = {**DOC_MASK, "train__steps": 2, "train__val_every": 1, "train__val_batches": 2}
    ref = _val_losses(0, 1, chat_data, str(tmp_path / "ref"), {**common, "train__micro_batch": 8})
    got = run_workers(
        _val_losses,
        2,
        chat_data,
        str(tmp_path / "run"),
        {**common, "parallel__dp_shard": 2, "train__micro_batch": 2},
    )
    assert sorted(ref) == [1, 2] and got[0].keys() == ref.keys()
    for step, value in ref.items():
        assert got[0][step] == pytest.approx(value, rel=1e-5)


UNTIED = {"model__tie_embeddings": "false", "model__n_layers": 4}
OTHER_LOSS_PATHS = {
    "tp2_loss_parallel": {"parallel__tp": 2, "parallel__loss_parallel": "true"},
    "pp2_1f1b": {"parallel__pp": 2, "parallel__pp_schedule": "1f1b", "train__micro_batch": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(OTHER_LOSS_PATHS))
def test_masked_loss_of_vocab_parallel_and_pipeline_losses_matches_one_process(
    layout, chat_data, tmp_path
):
    """The masked mean also holds for the vocabulary-parallel loss (tp) and the pipeline's
    per-micro-batch loss, whose schedule averages micro-batches."""
    degrees = {**DOC_MASK, **UNTIED, "parallel__dp_shard": 1, **OTHER_LOSS_PATHS[layout]}
    ref_overrides = {**DOC_MASK, **UNTIED, "train__micro_batch": 8}
    ref = train_collect(0, 1, chat_data, str(tmp_path / "ref"), ref_overrides)
    got = run_workers(train_collect, 2, chat_data, str(tmp_path / "run"), degrees, timeout_s=180)
    merged = {"losses": got[0]["losses"], "params": {}}
    for r in got:  # pipeline ranks each hold their own stages
        merged["params"].update(r["params"])
    assert_same_run(merged, ref)
