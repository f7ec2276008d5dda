"""A real S3-compatible HTTP server on loopback for tests: moto's ThreadedMotoServer.

A test that takes a `moto_s3` argument gets the server: `bucket = moto_s3.new_bucket()`, then
f"s3://{bucket}/prefix" through triaxis.storage, s3fs, boto3 or a subprocess. tests/conftest.py
makes the fixture known to every module; a module must not import it (it would then define, start
and stop a server of its own).

The fixture (one server per test session) points the AWS environment at the server:
AWS_ENDPOINT_URL, dummy credentials, a region, no profile files and no instance metadata
lookups, so subprocesses started by a test reach the same server. The environment is restored
when the session ends.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest


@dataclass
class S3Server:
    endpoint: str
    _client: object = None

    def client(self):
        import boto3

        if self._client is None:
            self._client = boto3.client("s3", endpoint_url=self.endpoint)
        return self._client

    _count = itertools.count()

    def new_bucket(self) -> str:
        name = f"triaxis-test-{os.getpid()}-{next(self._count)}"
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, uri: str, data: bytes) -> None:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, uri: str) -> bytes:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, uri: str) -> list[str]:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        out = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for o in out.get("Contents", []))


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
}


def start_server() -> tuple[object, str]:
    """moto's S3 server on a free loopback port: (the server, to stop; its endpoint URL)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def serve_for_this_process() -> tuple[object, str]:
    """start_server(), with this process's AWS environment (and its children's) pointed at it:
    for the benchmarks, which run outside pytest."""
    server, endpoint = start_server()
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    return server, endpoint


@pytest.fixture(scope="session")
def moto_s3():
    server, endpoint = start_server()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        yield S3Server(endpoint)
    server.stop()
