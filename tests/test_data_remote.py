"""Training data on S3 (moto's S3 server on loopback): the remote reader returns exactly the
local samples for any number of prefetch threads and data-parallel ranks; its cache is bounded
in bytes, least recently used out, and leaves no files behind; corrupted, truncated and missing
shards, a missing bucket and missing credentials give one clear error. Training from S3 through
the CLI: test_data_remote_train.py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import helpers
from triaxis.cli import main
from triaxis.data.dataset import TokenDataset, micro_batch_start
from triaxis.data.remote import _host
from triaxis.errors import UserError


def upload(s3, folder: str, uri: str) -> None:
    for f in sorted(Path(folder).iterdir()):
        s3.put(f"{uri}/{f.name}", f.read_bytes())


@pytest.fixture(scope="module")
def s3_data(moto_s3, byte_data) -> str:
    """conftest's byte_data (6+ train shards of 60,000 tokens) copied to S3."""
    uri = f"s3://{moto_s3.new_bucket()}/byte"
    upload(moto_s3, byte_data, uri)
    return uri


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_remote_samples_equal_local_for_any_threads_and_ranks(s3_data, byte_data, tmp_path):
    local = TokenDataset(byte_data, "train", seq_len=32, seed=5)
    ds = {
        t: TokenDataset(
            s3_data, "train", seq_len=32, seed=5, cache_dir=str(tmp_path), prefetch_threads=t
        )
        for t in (1, 4)
    }
    assert ds[1].num_windows == local.num_windows and len(ds[1].shard_tokens) > 3
    for start in (0, 40, local.num_windows - 3):  # the last one spans into the second epoch
        want = local.batch(start, 8).numpy()
        for d in ds.values():
            d.prefetch(start, 8)
            assert np.array_equal(d.batch(start, 8).numpy(), want)
    # dp ranks (two readers play them in turn): each prefetches exactly the shards of its own
    # micro-batches of this step and the next, and reads its slice of the global batch.
    global_batch, micro, cursor = 8, 2, 16
    for dp in (2, 4):
        got = []
        for r in range(dp):
            d = ds[(1, 4)[r % 2]]
            asked = []
            real, d.cache.prefetch = d.cache.prefetch, asked.extend
            d.prefetch(cursor, 2 * global_batch, micro, dp, r)
            d.cache.prefetch = real
            mine = [
                i
                for s in (cursor, cursor + global_batch)
                for m in range(global_batch // (micro * dp))
                for i in range(
                    micro_batch_start(s, m, micro, dp, r),
                    micro_batch_start(s, m, micro, dp, r) + micro,
                )
            ]
            assert asked == d.shards_of(mine) and len(mine) == 2 * global_batch // dp
            got.append(d.batch(micro_batch_start(cursor, 0, micro, dp, r), micro).numpy())
        assert np.array_equal(np.concatenate(got), local.batch(cursor, micro * dp).numpy())
    assert ds[4].cache.stats.hits > 0
    assert ds[1].tokenizer().decode(ds[1].sample(3)[:20].tolist()) == local.tokenizer().decode(
        local.sample(3)[:20].tolist()
    )
    for d in ds.values():
        d.close()
    assert cache_files(tmp_path) == [] and list(tmp_path.iterdir()) == []


SHARD_BYTES = 60_000 * 2
"""One shard of the `byte_data` fixture (60k uint16 tokens)."""


def cached(s3_data: str, tmp_path, cache_bytes: int, **kw) -> TokenDataset:
    """The S3 split with a local cache of `cache_bytes`, prefetching on 2 threads."""
    return TokenDataset(
        s3_data,
        "train",
        seq_len=32,
        seed=0,
        cache_dir=str(tmp_path),
        cache_gib=cache_bytes / 2**30,
        prefetch_threads=2,
        **kw,
    )


def test_cache_is_bounded_least_recently_used_out(s3_data, byte_data, tmp_path):
    # A process killed earlier left its cache folder: the first download sweeps it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"triaxis-cache-{_host()}-{dead.pid}-abc"
    (stale / "train_00000.bin").parent.mkdir()
    (stale / "train_00000.bin").write_bytes(b"old")
    live = tmp_path / f"triaxis-cache-{_host()}-{os.getpid()}-other"
    live.mkdir()

    budget = int(2.5 * SHARD_BYTES)
    ds = cached(s3_data, tmp_path, budget)
    cache = ds.cache

    def names() -> list[str]:
        return sorted(p.name for p in cache.folder.iterdir())

    cache.get(0), cache.get(1), cache.get(0), cache.get(2)  # 1 is least recently used
    assert not stale.exists() and live.exists()
    assert names() == ["train_00000.bin", "train_00002.bin"]
    assert cache.stats.evictions == 1 and cache.stats.hits == 1 and cache.stats.misses == 3
    # Prefetch evicts read shards (0, then 2) but never a prefetched shard not yet read.
    cache.prefetch([3, 4, 5])
    assert cache.stats.prefetch_skipped == 1
    assert np.array_equal(
        cache.get(4), np.fromfile(Path(byte_data, "train_00004.bin"), dtype=np.uint16)
    )
    cache.get(3)
    assert names() == ["train_00003.bin", "train_00004.bin"] and cache.stats.waits <= 2
    # Random access over the whole split: never more than the budget on disk, no temp files.
    for start in range(0, 160, 16):
        ds.batch(start, 16)
        on_disk = sum(p.stat().st_size for p in cache.folder.iterdir())
        assert on_disk <= budget and not [
            p for p in cache.folder.iterdir() if p.name.endswith(".part")
        ]
    assert cache.stats.evictions > 5
    folder = cache.folder
    ds.close()
    assert not folder.exists() and live.exists()
    with pytest.raises(UserError, match="smaller than the largest shard"):
        TokenDataset(s3_data, "train", 32, cache_dir=str(tmp_path), cache_gib=1e-6)


def corrupt(s3, src: str, dst: str, byte_data: str, how: str) -> None:
    upload(s3, byte_data, dst)
    raw = bytearray(Path(byte_data, "train_00001.bin").read_bytes())
    if how == "flip":
        raw[1000] ^= 0xFF
    elif how == "truncate":
        raw = raw[:-10]
    if how == "delete":
        s3.client().delete_object(
            Bucket=dst[5:].split("/")[0], Key=dst[5:].split("/", 1)[1] + "/train_00001.bin"
        )
    else:
        s3.put(f"{dst}/train_00001.bin", bytes(raw))


def test_corrupted_truncated_missing_shards(moto_s3, s3_data, byte_data, tmp_path):
    bucket = moto_s3.new_bucket()
    second_shard_sample = None
    for how, match in (
        (
            "flip",
            (
                r"train_00001.bin fails its sha256 check .* prepare the data "
                r"again \(triaxis prepare --output s3://"
            ),
        ),
        (
            "truncate",
            (
                r"train_00001.bin has 119990 bytes but the manifest says "
                r"120000"
            ),
        ),
        ("delete", r"train_00001.bin listed in the manifest is missing"),
    ):
        uri = f"s3://{bucket}/{how}"
        corrupt(moto_s3, s3_data, uri, byte_data, how)
        if how == "delete":
            with pytest.raises(UserError, match=match):
                TokenDataset(uri, "train", 32, cache_dir=str(tmp_path))
            continue
        ds = TokenDataset(uri, "train", 32, cache_dir=str(tmp_path), prefetch_threads=1)
        if second_shard_sample is None:
            second_shard_sample = next(i for i in range(ds.num_windows) if ds.shards_of([i]) == [1])
        ds.prefetch(second_shard_sample, 1)  # the error waits in the future for the read
        with pytest.raises(UserError, match=match):
            ds.batch(second_shard_sample, 1)
        assert ds.cache.folder is None or not any(ds.cache.folder.iterdir())  # nothing kept
        ds.close()
    assert list(tmp_path.iterdir()) == []


def one_error_line(capsys) -> str:
    return helpers.one_error_line(capsys.readouterr().err)


def test_cli_missing_bucket_no_credentials_no_manifest(s3_data, tmp_path, monkeypatch, capsys):
    args = [
        "train",
        "--model.preset=tiny",
        "--data.seq_len=32",
        "--metrics.progress=false",
        f"--train.run_dir={tmp_path / 'run'}",
        "--train.steps=1",
    ]
    assert main(args + ["--data.path=s3://no-such-bucket-triaxis/data"]) == 2
    assert "the bucket does not exist" in one_error_line(capsys)
    assert main(args + [f"--data.path={s3_data}-nothing-here"]) == 2
    assert "has no manifest.json" in one_error_line(capsys)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(args + [f"--data.path={s3_data}"]) == 2
    assert "no AWS credentials found" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_shard_groups_make_a_small_cache_enough(s3_data, tmp_path):
    """A cache of 4 of the split's shards, prefetching as the trainer does: over the first 12
    steps the global shuffle downloads a shard for most samples; groups of one shard-sized block
    read each shard about once in a whole epoch (a block straddles two). A cache too small for
    the groups is refused."""

    def downloaded(groups: int, steps: int | None) -> tuple[float, int]:
        ds = cached(s3_data, tmp_path, 4 * SHARD_BYTES, shuffle_shards=groups)
        starts = list(range(0, ds.num_windows - 32, 16))[:steps]
        for start in starts:
            ds.prefetch(start, 32)  # this step's samples and the next step's
            ds.batch(start, 16)
        got = ds.cache.stats.downloaded_bytes
        ds.close()
        return got / SHARD_BYTES, len(starts)

    global_shards, steps = downloaded(0, 12)
    grouped_shards, _ = downloaded(1, 12)
    epoch_shards, epoch_steps = downloaded(1, None)
    split_shards = len(TokenDataset(s3_data, "train", 32, cache_dir=str(tmp_path)).cache.files)
    print(
        f"\nshards downloaded in {steps} steps: global {global_shards:.1f}, groups of 1 "
        f"{grouped_shards:.1f}; a whole epoch ({epoch_steps} steps) in groups of 1: "
        f"{epoch_shards / split_shards:.2f} x the split"
    )
    assert global_shards > 5 * grouped_shards and grouped_shards <= 3
    assert epoch_shards <= 2.2 * split_shards
    with pytest.raises(UserError, match="shuffle_shards=2 reads up to 4 shards"):
        cached(s3_data, tmp_path, 4 * SHARD_BYTES, shuffle_shards=2)
