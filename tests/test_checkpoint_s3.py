"""Checkpoints in S3 through a real S3-compatible server on loopback (the AWS code path with an
endpoint override): async sharded saves with multipart uploads, resume, list/verify, retries
through a flaky proxy, and clear errors for a missing bucket or absent credentials."""

import os

import pytest

from tests.flaky_proxy import FlakyProxy
from tests.helpers import triaxis
from triaxis.checkpoint import manifest as mf


def args(data, run, uri, *extra):
    # ~2.3M parameters: the shard (~28 MB with AdamW state) goes up in 16 MiB multipart parts
    return [
        "train",
        "--model.preset=tiny",
        "--model.dim=192",
        "--model.ffn_dim=768",
        f"--data.path={data}",
        "--data.seq_len=32",
        f"--train.run_dir={run}",
        "--train.global_batch=8",
        "--train.micro_batch=8",
        "--metrics.log_every=1",
        "--train.val_every=0",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
        f"--checkpoint.dir={uri}",
        "--checkpoint.interval=2",
        *extra,
    ]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow  # a fast lane under 3 min: its layer keeps a fast test
def test_missing_bucket_and_credentials(moto_s3, byte_data, tmp_path):
    out = triaxis(
        *args(byte_data, tmp_path / "r", "s3://no-such-bucket-x/p", "--train.steps=1"), check=False
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "bucket no-such-bucket-x does not exist" in out.stderr
    uri = f"s3://{moto_s3.new_bucket()}/p"
    env = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
    }
    out = triaxis(*args(byte_data, tmp_path / "r2", uri, "--train.steps=1"), env=env, check=False)
    assert out.returncode == 2 and "no AWS credentials found" in out.stderr, out.stderr[-2000:]


def _client_id(_rank: int, _world: int) -> int:
    from triaxis import storage_client

    return id(storage_client.s3_filesystem())


def test_one_s3_client_per_process_and_settings(moto_s3, monkeypatch):
    """Building an S3 client costs ~0.3 s (bench/storage_calls.py): storage keeps one per
    process and AWS settings, and builds a new one when a setting changes or after fork."""
    import multiprocessing

    from triaxis import storage, storage_client

    first = storage_client.s3_filesystem()
    assert storage_client.s3_filesystem() is first
    bucket = moto_s3.new_bucket()
    storage.write_bytes(f"s3://{bucket}/a", b"1")
    assert storage.exists(f"s3://{bucket}/a") and storage_client.s3_filesystem() is first
    # Another process writes; this client sees it at once (no listings cache).
    moto_s3.put(f"s3://{bucket}/b", b"2")
    assert storage.listdir(f"s3://{bucket}") == ["a", "b"] and storage.exists(f"s3://{bucket}/b")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "other")
    assert storage_client.s3_filesystem() is not first
    monkeypatch.undo()
    assert storage_client.s3_filesystem() is first
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_client_id, (0, 1)) != id(first)


class Outage:
    """The storage service goes away when the first request for `trigger` arrives, for
    `seconds` (None: for good)."""

    def __init__(self, trigger: str, seconds: float | None):
        self.trigger, self.seconds, self.since = trigger, seconds, None

    def __call__(self, method: str, path: str) -> bool:
        import time

        if self.since is None and self.trigger in path:
            self.since = time.monotonic()
        return self.since is not None and (
            self.seconds is None or time.monotonic() - self.since < self.seconds
        )


@pytest.mark.slow
def test_outage_during_an_async_save_is_retried(moto_s3, byte_data, tmp_path):
    """A 15 s outage that starts in the middle of an async save: the save is retried (all
    ranks together) until the store is back; the run finishes, nothing is lost."""
    bucket = moto_s3.new_bucket()
    outage = Outage("step_00000004/__0_0.distcp", 15)
    proxy = FlakyProxy(moto_s3.endpoint, fail_every=10**9, fail_if=outage)
    uri = f"s3://{bucket}/outage"
    try:
        out = triaxis(
            *args(
                byte_data, tmp_path / "run", uri, "--train.steps=6", "--checkpoint.async_save=true"
            ),
            env={"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "2"},
        )
    finally:
        proxy.close()
    assert outage.since is not None and proxy.failed > 0
    assert "storage error" in out.stdout and "retrying" in out.stdout
    found = mf.list_checkpoints(uri)
    assert [f.step for f in found] == [2, 4, 6]
    problems = {f.step: mf.verify(f.path) for f in found}
    assert not any(problems.values()), (problems, out.stdout)


@pytest.mark.slow
def test_failed_saves_are_skipped_then_stop_the_run(moto_s3, byte_data, tmp_path):
    """The store stays away: each save is retried for checkpoint.retry_s, then skipped with a
    warning while training goes on; checkpoint.max_failed_saves in a row stop the run with
    one line. The checkpoint saved before the outage stays whole."""
    bucket = moto_s3.new_bucket()
    proxy = FlakyProxy(moto_s3.endpoint, fail_every=10**9, fail_if=Outage("step_00000004/", None))
    uri = f"s3://{bucket}/down"
    try:
        out = triaxis(
            *args(
                byte_data,
                tmp_path / "run",
                uri,
                "--train.steps=20",
                "--checkpoint.retry_s=2",
                "--checkpoint.max_failed_saves=2",
            ),
            env={"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "2"},
            check=False,
        )
    finally:
        proxy.close()
    # The run lease lives in the same bucket: its heartbeat may warn during the outage too.
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(errors) == 1 and all(
        line.startswith("warning: ") for line in lines if line not in errors
    ), out.stderr[-3000:]
    err = errors[0]
    assert "step_00000006 could not be saved" in err and "2 failed save(s) in a row" in err
    assert "step_00000004 could not be saved" in out.stdout and "training goes on" in out.stdout
    assert [f.step for f in mf.list_checkpoints(uri)] == [2]
    assert mf.verify(mf.list_checkpoints(uri)[0].path) == []


@pytest.mark.slow
def test_a_refused_key_is_named_as_such(byte_data, tmp_path):
    """S3 answers a wrong access key with 403 InvalidAccessKeyId: the run says the
    credentials were refused (not that the bucket does not exist)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
        b"<Message>The AWS Access Key Id you provided does not exist in our records."
        b"</Message></Error>"
    )

    class Refuse(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "AWS_ACCESS_KEY_ID": "AKIAWRONG",
        "AWS_SECRET_ACCESS_KEY": "wrong",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
    }
    try:
        out = triaxis(
            *args(byte_data, tmp_path / "r", "s3://some-bucket/p", "--train.steps=1"),
            env=env,
            check=False,
        )
    finally:
        server.shutdown()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "credentials were refused" in out.stderr and "does not exist;" not in out.stderr


@pytest.mark.slow
def test_saves_never_read_back_what_they_wrote(moto_s3, byte_data, tmp_path):
    """Checksums are computed as the bytes go out: saving downloads no shard and no
    metadata (the old sidecar step re-read every file it had just uploaded)."""
    seen: list[tuple[str, str]] = []

    def record(method: str, path: str) -> bool:
        seen.append((method, path))
        return False

    proxy = FlakyProxy(moto_s3.endpoint, fail_every=10**9, fail_if=record)
    uri = f"s3://{moto_s3.new_bucket()}/noread"
    try:
        triaxis(
            *args(byte_data, tmp_path / "run", uri, "--train.steps=4", "--checkpoint.resume=none"),
            env={"AWS_ENDPOINT_URL": proxy.endpoint},
        )
    finally:
        proxy.close()
    assert any(m == "PUT" and ".distcp" in p for m, p in seen)  # the shards went up here
    reads = [
        p
        for m, p in seen  # object downloads (listings are GETs of the bucket)
        if m == "GET" and p.split("?")[0].endswith((".distcp", ".metadata"))
    ]
    assert reads == [], reads
    assert all(mf.verify(f.path) == [] for f in mf.list_checkpoints(uri))
