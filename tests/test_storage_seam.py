"""Every S3 access goes through the storage seam: one place (`triaxis.storage_client`) builds the
clients and reads their settings, one bucket check speaks for every setting (checkpoint.dir,
--input, --output), and the data pipeline's listings, streaming and batched writes are small
`triaxis.storage` functions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from triaxis import storage, storage_client
from triaxis.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "triaxis"
S3_SETTINGS = re.compile(
    r"environ[^\n]*AWS_ENDPOINT_URL|S3FileSystem\(|endpoint_url|"
    r"boto3\.client\(\s*['\"]s3|call_s3\("
)
"""Code that builds an S3 client or reads its settings itself, outside the seam."""


def test_only_storage_builds_s3_clients_or_reads_their_settings():
    offenders = [
        f"{p.relative_to(PACKAGE)}: {m.group(0)}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "storage_client.py"
        for m in S3_SETTINGS.finditer(p.read_text())
    ]
    assert offenders == []
    assert not (PACKAGE / "data" / "remote_io.py").exists()  # the second client pool is gone


def test_s3_options_and_the_checkpoint_writer_and_reader_share_them(monkeypatch):
    from triaxis.checkpoint import dcp_io

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert storage_client.s3_options() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8")
    assert storage_client.s3_options() == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:8"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # the S3-specific wins
    want = {"endpoint_url": "http://127.0.0.1:9"}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    assert storage_client.s3_filesystem().client_kwargs == want
    # DCP builds its own s3fs filesystem: from the same settings (nothing is contacted yet).
    assert dcp_io.writer("s3://b/p").fs.fs.client_kwargs == want
    assert dcp_io.reader("s3://b/p", None).fs.fs.client_kwargs == want


def test_one_bucket_check_one_message(moto_s3):  # noqa: F811
    for what in ("checkpoint.dir", "--input", "--output"):
        with pytest.raises(UserError) as e:
            storage_client.check_location("s3://no-such-bucket-seam/p", what)
        assert str(e.value) == (
            f"{what} s3://no-such-bucket-seam/p: the bucket "
            "no-such-bucket-seam does not exist; create it (aws s3 mb "
            "s3://no-such-bucket-seam) or fix the URI"
        )
    storage_client.check_location(f"s3://{moto_s3.new_bucket()}/p", "--output")  # exists: no error
    # Schemes without buckets (memory, http, hf) are left to their first real access.
    storage_client.check_location("memory://nowhere/p", "--input")


def test_listing_streaming_copy_and_batched_remove(moto_s3):  # noqa: F811
    base = f"s3://{moto_s3.new_bucket()}"
    lines = b"".join(b'{"text": "doc %d"}\n' % i for i in range(2000))
    moto_s3.put(f"{base}/in/a.jsonl", lines)
    moto_s3.put(f"{base}/in/b.jsonl", b'{"text": "b"}\n')
    moto_s3.put(f"{base}/in/notes.md", b"# notes")
    jsonl = [f"{base}/in/a.jsonl", f"{base}/in/b.jsonl"]
    assert storage.list_files(f"{base}/in/*.jsonl", (".md",)) == jsonl  # a glob: all matches
    assert storage.list_files(f"{base}/in", (".jsonl",)) == jsonl  # a prefix: by extension
    assert storage.list_files(f"{base}/in/notes.md", (".jsonl",)) == [f"{base}/in/notes.md"]
    assert storage.list_files(f"{base}/none", (".jsonl",)) == []

    # Streamed in ranged reads smaller than the object: every line arrives, in order.
    with storage.open_read(jsonl[0], buffer_bytes=4096) as f:
        assert f.peek(1)[:1] == b"{"
        assert b"".join(f) == lines
    with storage.open_read(jsonl[0]) as f:  # unbuffered: seeks to known offsets
        f.seek(-len(b'{"text": "doc 1999"}\n'), 2)
        assert f.read() == b'{"text": "doc 1999"}\n'

    storage.copy(jsonl[0], f"{base}/out/a.jsonl")
    assert moto_s3.get(f"{base}/out/a.jsonl") == lines
    storage.remove_all([*jsonl, f"{base}/in/missing.jsonl"])  # missing ones are fine
    assert moto_s3.keys(f"{base}/in/") == ["in/notes.md"]
    storage.remove_all([])


def test_local_paths_take_the_same_functions(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b'{"text": "x"}\n')
    storage.copy(str(src), str(tmp_path / "sub" / "b.jsonl"))
    with storage.open_read(str(tmp_path / "sub" / "b.jsonl"), 4096) as f:
        assert f.read() == b'{"text": "x"}\n'
    storage.remove_all([str(src), str(tmp_path / "missing")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_move_renames_a_folder_tree_on_s3_and_on_disk(moto_s3, tmp_path):  # noqa: F811
    # What a resume does to an invalid checkpoint: step_X -> step_X.invalid, every file along.
    base = f"s3://{moto_s3.new_bucket()}/ckpt"
    moto_s3.put(f"{base}/step_2/triaxis.json", b"{}")
    moto_s3.put(f"{base}/step_2/sub/__0_0.distcp", b"shard")
    storage.move(f"{base}/step_2", f"{base}/step_2.invalid")
    assert moto_s3.keys(f"{base}/") == [
        "ckpt/step_2.invalid/sub/__0_0.distcp",
        "ckpt/step_2.invalid/triaxis.json",
    ]
    (tmp_path / "step_2" / "sub").mkdir(parents=True)
    (tmp_path / "step_2" / "sub" / "__0_0.distcp").write_bytes(b"shard")
    storage.move(str(tmp_path / "step_2"), str(tmp_path / "step_2.invalid"))
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "step_2.invalid",
        "step_2.invalid/sub",
        "step_2.invalid/sub/__0_0.distcp",
    ]
