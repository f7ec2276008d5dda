"""checkpoint.hf with the checkpoints in S3 (moto's server on loopback): every rank stages its
share of the safetensors on its own disk and uploads it under the checkpoint's `.hf.partial/`,
and rank 0 moves the objects into `hf/` with config.json last; the folder, downloaded, gives
the logits of export-hf of the same checkpoint, and nothing staged is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_workers
from tests.test_hf_run_output import HF, _logits, train_with_hf
from triaxis import storage
from triaxis.checkpoint import manifest as mf


@pytest.mark.slow
def test_run_writes_its_hf_folder_to_s3_every_rank_a_share(moto_s3, byte_data, tmp_path):  # noqa: F811
    from triaxis.hf.exporter import export_hf

    ckpt = f"s3://{moto_s3.new_bucket()}/runs/hf"
    over = {**HF, "checkpoint__dir": ckpt, "parallel__dp_shard": 2, "train__micro_batch": 4}
    written = run_workers(train_with_hf, 2, byte_data, str(tmp_path / "run"), over)
    assert all(b > 0 for b in written), written  # each rank uploaded a share
    step = mf.list_checkpoints(ckpt)[-1].path
    names = storage.listdir(storage.join(step, "hf"))
    assert "config.json" in names and "model.safetensors.index.json" in names, names
    assert ".hf.partial" not in storage.listdir(step)
    local = tmp_path / "hf"
    local.mkdir()
    for name in names:
        (local / name).write_bytes(storage.read_bytes(storage.join(step, "hf", name)))
    index = json.loads((local / "model.safetensors.index.json").read_text())
    assert sum(written) == index["metadata"]["total_size"]
    export_hf(step, str(tmp_path / "export"), log=lambda _m: None)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        _logits(local, tokens), _logits(Path(tmp_path / "export"), tokens), rtol=0, atol=0
    )
