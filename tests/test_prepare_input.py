"""prepare reads every input document unless the user set --max-bytes, and says in one line each
what it skipped (blank documents), repaired (invalid UTF-8) or left unread (a limit)."""

from __future__ import annotations

import json

import pytest

from triaxis.data import prepare as prep
from triaxis.data.prepare import PrepareOptions, prepare


def run(tmp_path, inputs, **kw):
    lines: list[str] = []
    opts = dict(inputs=[str(p) for p in inputs], output=str(tmp_path / "out"), workers=1, **kw)
    manifest = prepare(PrepareOptions(**{"tokenizer": "byte", **opts}), log=lines.append)
    splits = manifest["splits"]
    return splits["train"]["documents"] + splits["val"]["documents"], lines


@pytest.mark.slow
def test_a_12_4_mb_input_is_tokenized_whole_by_default(tmp_path):
    """The reported case: 3,100 documents, 12.4 MB; the old default dropped the last 94."""
    doc = ("x" * 3999 + "\n").replace("x" * 10, "token shard", 1)
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i} {doc}"}) + "\n" for i in range(3100)))
    docs, lines = run(tmp_path, [path])
    assert docs == 3100, lines
    assert not any("unread" in line for line in lines)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_every_document_is_tokenized_and_the_bpe_sample_is_limited(
    tmp_path, monkeypatch, tokenizer
):
    monkeypatch.setattr(prep, "BPE_SAMPLE_CHARS", 2_000)  # BPE trains on a sample only
    path = tmp_path / "a.txt"
    path.write_text("def token shard return fine-tune " * 100)
    paths = [path] + [tmp_path / f"{i}.txt" for i in range(9)]
    for p in paths[1:]:
        p.write_text(f"{p.name} " * 50)
    docs, lines = run(tmp_path, paths, tokenizer=tokenizer, vocab_size=300)
    assert docs == 10, lines
    assert lines == [x for x in lines if "unread" not in x and "skipped" not in x]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt"])
def test_blank_documents_and_a_limit_are_reported(tmp_path, fmt):
    texts = ["alpha " * 20, "", "  \n", "beta " * 20, None, "gamma " * 20, "delta " * 20]
    if fmt == "jsonl":
        path = tmp_path / "in.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        blank = 3
    elif fmt == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"text": texts}), path)
        blank = 3
    else:  # a text file is one document: blank files are the blank documents
        for i, t in enumerate(texts):
            (tmp_path / f"{i}.txt").write_text(t or "")
        path, blank = tmp_path / "*.txt", 3
    docs, lines = run(tmp_path, [path])
    assert docs == 4
    assert f"skipped {blank} empty or blank documents" in lines, lines

    docs, lines = run(tmp_path, [path], max_bytes=150)  # stops after the second document
    unread = [x for x in lines if "unread" in x]
    assert docs == 2 and len(unread) == 1, lines
    assert "--max-bytes 150 left 2 documents (240 characters) unread" in unread[0], unread


def test_invalid_utf8_is_reported(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 token shard " * 10)
    (tmp_path / "b.txt").write_text("fine " * 10)
    docs, lines = run(tmp_path, [tmp_path / "*.txt"])
    assert docs == 2
    assert any(x.startswith("1 documents held invalid UTF-8") for x in lines), lines
