"""Checkpoints in S3 through a real S3-compatible server on loopback (the AWS code path with an
endpoint override): async sharded saves with multipart uploads, resume, list/verify, retries
through a flaky proxy, and clear errors for a missing bucket or absent credentials."""

import os
import subprocess
import sys

from tests.flaky_proxy import FlakyProxy
from tests.s3_server import moto_s3  # noqa: F401  (fixture)
from triaxis.checkpoint import manifest as mf


def triaxis(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "triaxis", *map(str, args)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def args(data, run, uri, *extra):
    # ~2.3M parameters: the shard (~28 MB with AdamW state) goes up in 16 MiB multipart parts
    return ["train", "--model.preset=tiny", "--model.dim=192", "--model.ffn_dim=768",
            f"--data.path={data}", "--data.seq_len=32", f"--train.run_dir={run}",
            "--train.global_batch=8", "--train.micro_batch=8", "--metrics.log_every=1",
            "--train.val_every=0", "--metrics.progress=false", "--metrics.tensorboard=false",
            f"--checkpoint.dir={uri}", "--checkpoint.interval=2", *extra]


def test_s3_checkpoints_resume_and_verify(moto_s3, byte_data, tmp_path):
    uri = f"s3://{moto_s3.new_bucket()}/runs/one"
    triaxis(*args(byte_data, tmp_path / "run", uri, "--train.steps=4"))
    found = mf.list_checkpoints(uri)
    assert [f.step for f in found] == [2, 4]
    assert mf.verify(found[-1].path) == []
    listing = triaxis("ckpt", "list", uri).stdout
    assert "       4" in listing
    # a shard over 16 MiB was uploaded in parts: S3 marks such objects' ETag with "-<parts>"
    client = moto_s3.client()
    bucket, prefix = uri[5:].split("/", 1)
    shard = next(k for k in moto_s3.keys(uri) if k.endswith(".distcp"))
    assert "-" in client.head_object(Bucket=bucket, Key=shard)["ETag"]
    out = triaxis(*args(byte_data, tmp_path / "run", uri, "--train.steps=6"))
    assert f"resumed from {uri}/step_00000004 at step 4" in out.stdout
    assert [f.step for f in mf.list_checkpoints(uri)] == [2, 4, 6]


def test_transient_storage_errors_are_retried(moto_s3, byte_data, tmp_path):
    bucket = moto_s3.new_bucket()
    proxy = FlakyProxy(moto_s3.endpoint, fail_every=7)
    try:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "10"}
        uri = f"s3://{bucket}/flaky"
        triaxis(*args(byte_data, tmp_path / "run", uri, "--train.steps=4"), env=env)
        assert proxy.failed > 3  # failures really happened ...
    finally:
        proxy.close()
    found = mf.list_checkpoints(uri)  # ... and nothing was lost (read back directly)
    assert [f.step for f in found] == [2, 4]
    assert {f.step: mf.verify(f.path) for f in found} == {2: [], 4: []}


def test_missing_bucket_and_credentials(moto_s3, byte_data, tmp_path):
    out = triaxis(*args(byte_data, tmp_path / "r", "s3://no-such-bucket-x/p", "--train.steps=1"),
                  check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "bucket 'no-such-bucket-x' does not exist" in out.stderr
    uri = f"s3://{moto_s3.new_bucket()}/p"
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    out = triaxis(*args(byte_data, tmp_path / "r2", uri, "--train.steps=1"), env=env,
                  check=False)
    assert out.returncode == 2 and "no AWS credentials found" in out.stderr, out.stderr[-2000:]


def _client_id(_rank: int, _world: int) -> int:
    from triaxis import storage

    return id(storage.s3_filesystem())


def test_one_s3_client_per_process_and_settings(moto_s3, monkeypatch):
    """Building an S3 client costs ~0.3 s (bench/storage_calls.py): storage keeps one per
    process and AWS settings, and builds a new one when a setting changes or after fork."""
    import multiprocessing

    from triaxis import storage

    first = storage.s3_filesystem()
    assert storage.s3_filesystem() is first
    bucket = moto_s3.new_bucket()
    storage.write_bytes(f"s3://{bucket}/a", b"1")
    assert storage.exists(f"s3://{bucket}/a") and storage.s3_filesystem() is first
    # Another process writes; this client sees it at once (no listings cache).
    moto_s3.put(f"s3://{bucket}/b", b"2")
    assert storage.listdir(f"s3://{bucket}") == ["a", "b"] and storage.exists(f"s3://{bucket}/b")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "other")
    assert storage.s3_filesystem() is not first
    monkeypatch.undo()
    assert storage.s3_filesystem() is first
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_client_id, (0, 1)) != id(first)
