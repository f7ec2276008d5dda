"""`triaxis prepare`: parallel tokenization gives the single-worker shards byte for byte; text,
JSON Lines, JSON and Parquet inputs; local and s3:// inputs and outputs; clear errors."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests import helpers
from tests.helpers import prepare_quietly
from triaxis.cli import main
from triaxis.data.encode import CHUNK_DOCS
from triaxis.data.prepare import PrepareOptions, prepare
from triaxis.errors import UserError

WORDS = ["def", "return", "self", "naïve", "λx", "数据", "token", "shard", "✓", "\n", "  "]


def make_corpus(root: Path) -> list[str]:
    """Files of every format under `root`; returns the non-blank documents in reading order."""
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)

    def doc() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))

    root.mkdir(parents=True, exist_ok=True)
    docs: list[str] = []
    (root / "a").mkdir(exist_ok=True)
    for i in range(3):  # plain text: one document per file
        text = doc()
        (root / "a" / f"{i:03d}.txt").write_text(text)
        docs.append(text)
    lines = []
    for i in range(300):  # JSON Lines, with blank and null documents that are skipped
        text = "" if i % 50 == 7 else doc()
        lines.append(json.dumps({"text": None if i % 50 == 9 else text, "id": i}))
        if text and i % 50 != 9:
            docs.append(text)
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    array = [doc() for _ in range(20)]  # one JSON array
    (root / "c.json").write_text(json.dumps([{"text": t} for t in array]))
    docs += array
    rows = [doc() for _ in range(200)]  # Parquet, two row groups
    pq.write_table(
        pa.table({"text": rows, "n": list(range(200))}), root / "d.parquet", row_group_size=120
    )
    docs += rows
    (root / "ignored.bin").write_bytes(b"\x00\x01")  # not a text extension
    assert len(docs) > CHUNK_DOCS  # more than one chunk: the pool really runs
    return docs


def read_split(folder: Path, manifest: dict, split: str) -> np.ndarray:
    files = [folder / s["file"] for s in manifest["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype=manifest["dtype"]) for f in files])


def test_workers_give_identical_shards_and_every_format(tmp_path):
    docs = make_corpus(tmp_path / "in")
    logs: list[str] = []
    manifests = {}
    for workers in (1, 2, 3):
        manifests[workers] = prepare(
            PrepareOptions(
                inputs=[str(tmp_path / "in")],
                output=str(tmp_path / f"out{workers}"),
                tokenizer="byte",
                val_fraction=0.1,
                shard_tokens=20_000,
                workers=workers,
            ),
            log=logs.append,
        )
    wrote = [x for x in logs if x.startswith("wrote")]
    assert "(2 worker processes)" in wrote[1] and "(3 worker processes)" in wrote[2]
    assert logs.count("skipped 12 empty or blank documents") == 3  # the blank and null ones
    assert manifests[1]["splits"] == manifests[2]["splits"] == manifests[3]["splits"]
    assert len(manifests[1]["splits"]["train"]["shards"]) > 3
    for shard in manifests[1]["splits"]["train"]["shards"]:
        assert (tmp_path / "out1" / shard["file"]).read_bytes() == (
            tmp_path / "out3" / shard["file"]
        ).read_bytes()
    # Every document, in order, each followed by EOS; every 10th document in val.
    for split, want in (
        ("train", [d for i, d in enumerate(docs) if i % 10 != 9]),
        ("val", [d for i, d in enumerate(docs) if i % 10 == 9]),
    ):
        tokens = read_split(tmp_path / "out2", manifests[2], split)
        assert tokens[-1] == 256 and (tokens == 256).sum() == len(want)
        eos_at = np.flatnonzero(tokens == 256)
        pieces = np.split(tokens, eos_at + 1)[:-1]
        got = [bytes(p[:-1].astype(np.uint8)).decode() for p in pieces]
        assert got == want, split


def test_bpe_identical_for_any_worker_count(tmp_path):
    make_corpus(tmp_path / "in")
    out = {}
    for workers in (1, 2):
        out[workers] = prepare_quietly(
            inputs=[str(tmp_path / "in" / "b.jsonl"), str(tmp_path / "in" / "d.parquet")],
            output=str(tmp_path / f"bpe{workers}"),
            vocab_size=320,
            shard_tokens=5_000,
            workers=workers,
        )
    assert out[1] == out[2]
    assert (tmp_path / "bpe1" / "tokenizer.json").read_bytes() == (
        tmp_path / "bpe2" / "tokenizer.json"
    ).read_bytes()


def test_small_corpus_gives_its_last_document_to_val(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 10)
    m = prepare_quietly(
        inputs=[str(tmp_path / "*.txt")],
        output=str(tmp_path / "o"),
        tokenizer="byte",
        val_fraction=0.1,
    )
    assert m["splits"]["train"]["documents"] == 2 and m["splits"]["val"]["documents"] == 1
    val = np.fromfile(tmp_path / "o" / "val_00000.bin", dtype=np.uint16)
    assert bytes(val[:-1].astype(np.uint8)).decode() == "document 2 " * 10


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("x.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', "x.jsonl line 2 has no 'text' field"),
        ("y.jsonl", '{"text": "ok"}\nnot json\n', "y.jsonl line 2 is not valid JSON"),
        ("z.json", '[{"text": 3}]', "'text' is a int, not a string"),
    ],
)
def test_bad_json_inputs_are_named(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=match):
        prepare_quietly(inputs=[str(tmp_path / name)], output=str(tmp_path / "o"), tokenizer="byte")


def test_parquet_without_text_column(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"p.parquet has no 'text' column \(columns: \['content'"):
        prepare_quietly(
            inputs=[str(tmp_path / "p.parquet")], output=str(tmp_path / "o"), tokenizer="byte"
        )


def test_s3_input_and_output_match_local(tmp_path, moto_s3):
    make_corpus(tmp_path / "in")
    bucket = moto_s3.new_bucket()
    for f in sorted((tmp_path / "in").rglob("*")):
        if f.is_file():
            moto_s3.put(f"s3://{bucket}/in/{f.relative_to(tmp_path / 'in')}", f.read_bytes())
    opts = {"tokenizer": "byte", "val_fraction": 0.1, "shard_tokens": 20_000, "workers": 2}
    local = prepare_quietly(
        inputs=[str(tmp_path / "in")], output=str(tmp_path / "l"), **{**opts, "workers": 1}
    )
    remote = prepare_quietly(inputs=[f"s3://{bucket}/in"], output=f"s3://{bucket}/out", **opts)
    assert remote["splits"] == local["splits"]
    stored = json.loads(moto_s3.get(f"s3://{bucket}/out/manifest.json"))
    assert stored["splits"] == local["splits"]
    for shard in local["splits"]["train"]["shards"]:
        assert (
            moto_s3.get(f"s3://{bucket}/out/{shard['file']}")
            == (tmp_path / "l" / shard["file"]).read_bytes()
        )
    # A glob over s3://, and preparing again into the same prefix replaces the old shards.
    again = prepare_quietly(
        inputs=[f"s3://{bucket}/in/*.jsonl"], output=f"s3://{bucket}/out", **opts
    )
    assert again["splits"]["train"]["documents"] + again["splits"]["val"]["documents"] == 288
    names = {k.rsplit("/", 1)[1] for k in moto_s3.keys(f"s3://{bucket}/out/")}
    want = {s["file"] for split in again["splits"].values() for s in split["shards"]}
    assert names == want | {"manifest.json"}


def error_line(capsys) -> str:
    return helpers.one_error_line(capsys.readouterr().err)


def test_cli_missing_bucket_and_credentials(tmp_path, moto_s3, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("some text " * 20)
    base = ["prepare", "--input", str(tmp_path / "a.txt"), "--tokenizer", "byte"]
    assert main(base + ["--output", "s3://no-such-bucket-triaxis/out"]) == 2
    assert "bucket no-such-bucket-triaxis does not exist" in error_line(capsys)
    assert (
        main(
            [
                "prepare",
                "--input",
                "s3://no-such-bucket-triaxis/in",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "bucket no-such-bucket-triaxis does not exist" in error_line(capsys)
    bucket = moto_s3.new_bucket()
    assert (
        main(["prepare", "--input", f"s3://{bucket}/nothing/", "--output", str(tmp_path / "o")])
        == 2
    )
    assert "matches no object" in error_line(capsys)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(base + ["--output", f"s3://{bucket}/out"]) == 2
    assert "no AWS credentials found" in error_line(capsys)
    assert main(base + ["--output", str(tmp_path / "o"), "--workers", "-1"]) == 2
    assert "--workers -1 must be >= 0" in error_line(capsys)
