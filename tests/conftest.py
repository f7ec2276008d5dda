import os

import pytest
import torch

# Forked workers hang when the parent already spun up several OpenMP threads (shared notes).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> str:
    """A small prepared corpus with the byte tokenizer (no BPE training: fast)."""
    from triaxis.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("byte_data")
    prepare(
        PrepareOptions(
            inputs=[],
            output=str(out),
            tokenizer="byte",
            max_bytes=400_000,
            val_fraction=0.1,
            shard_tokens=60_000,
        ),
        log=lambda *_: None,
    )
    return str(out)


@pytest.fixture(autouse=True)
def _restore_environ():
    """The launcher sets its network variables in os.environ (for its workers); in-process CLI
    calls must not leak them into later tests' subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
