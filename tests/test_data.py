import numpy as np
import pytest

from tests.helpers import prepare_quietly
from triaxis.data.dataset import TokenDataset, micro_batch_start
from triaxis.data.prepare import PrepareOptions, prepare
from triaxis.data.sample_order import permute
from triaxis.data.tokenizer import BPETokenizer, ByteTokenizer
from triaxis.errors import UserError


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text


def test_bpe_round_trip_and_compression():
    corpus = ["def add(a, b):\n    return a + b\n" * 20, "class Foo:\n    pass\n" * 20]
    tok = BPETokenizer.train(iter(corpus), vocab_size=300)
    text = "def add(x, y):\n    return x + y  # ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learned from the corpus
    assert tok.eos_id is not None


def test_permutation_is_a_bijection():
    for n in (1, 2, 7, 100, 1000):
        assert sorted(permute(j, n, key=42) for j in range(n)) == list(range(n))
    assert [permute(j, 1000, 1) for j in range(10)] != [permute(j, 1000, 2) for j in range(10)]


def test_sample_is_pure_function_of_seed_and_index(byte_data):
    a = TokenDataset(byte_data, "train", seq_len=32, seed=7)
    b = TokenDataset(byte_data, "train", seq_len=32, seed=7)
    c = TokenDataset(byte_data, "train", seq_len=32, seed=8)
    for i in (0, 5, a.num_windows + 3):  # into the second epoch too
        assert np.array_equal(a.sample(i), b.sample(i))
    assert any(not np.array_equal(a.sample(i), c.sample(i)) for i in range(5))
    assert len(a.shards) > 1  # samples span shard boundaries


def test_same_samples_whatever_the_number_of_readers(byte_data):
    """Sample ids consumed per step are identical for dp = 1, 2, 4 (micro-batch shrinks)."""
    ds = TokenDataset(byte_data, "train", seq_len=16, seed=3)
    global_batch, cursor = 8, 40
    seen = {}
    for dp in (1, 2, 4):
        ids = []
        micro = global_batch // dp
        for rank in range(dp):
            start = micro_batch_start(cursor, 0, micro, dp, rank)
            ids += list(range(start, start + micro))
        seen[dp] = sorted(ids)
        batches = [ds.batch(micro_batch_start(cursor, 0, micro, dp, r), micro) for r in range(dp)]
        assert np.array_equal(
            np.concatenate([b.numpy() for b in batches]), ds.batch(cursor, global_batch).numpy()
        )
    assert seen[1] == seen[2] == seen[4] == list(range(40, 48))


def test_epoch_covers_every_window_once(byte_data):
    ds = TokenDataset(byte_data, "train", seq_len=64, seed=0)
    windows = [ds.window_of(i) for i in range(ds.num_windows)]
    assert sorted(windows) == list(range(ds.num_windows))


def test_manifest_checksums_detect_corruption(byte_data, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(byte_data, copy)
    TokenDataset(copy, "train", 32, verify=True)
    shard = copy / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="fails its sha256 check"):
        TokenDataset(copy, "train", 32, verify=True)


def test_prepare_inputs_and_errors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world " * 50)
    (tmp_path / "docs" / "b.md").write_text("more text " * 50)
    m = prepare_quietly(
        inputs=[str(tmp_path / "docs")],
        output=str(tmp_path / "out"),
        tokenizer="byte",
        val_fraction=0.5,
    )
    assert m["splits"]["train"]["documents"] == 1 and m["splits"]["val"]["documents"] == 1
    assert m["dtype"] == "uint16"
    with pytest.raises(UserError, match="matches no file"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "nope*.txt")], output=str(tmp_path / "x")))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="hold no text"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "empty.txt")], output=str(tmp_path / "y")))
    with pytest.raises(UserError, match="does not exist"):
        TokenDataset(tmp_path / "missing", "train", 32)


def _grouped(num_windows: int, block: int, groups: int, seed: int = 5) -> TokenDataset:
    """The order of a split of `num_windows` windows, blocks of `block`, groups of `groups`."""
    ds = object.__new__(TokenDataset)
    ds.num_windows, ds.block_windows, ds.group_blocks, ds.seed = num_windows, block, groups, seed
    return ds


def test_shard_group_shuffle_is_a_bijection_per_epoch():
    for n, b, g in [
        (1, 1, 1),
        (10, 3, 1),
        (10, 3, 2),
        (97, 8, 3),
        (96, 8, 4),
        (200, 7, 5),
        (5, 8, 2),
        (64, 64, 8),
    ]:
        ds = _grouped(n, b, g)
        for epoch in (0, 1):
            order = [ds.window_of(epoch * n + j) for j in range(n)]
            assert sorted(order) == list(range(n)), (n, b, g)
    a, b = _grouped(97, 8, 3), _grouped(97, 8, 3, seed=6)
    assert [a.window_of(j) for j in range(97)] != [b.window_of(j) for j in range(97)]
    assert [a.window_of(j) for j in range(97)] != [a.window_of(97 + j) for j in range(97)]


def test_shard_group_shuffle_reads_few_shards_per_step(byte_data):
    """Global shuffle: a step of 16 samples touches most shards; groups of 1 or 2 shard-sized
    blocks: at most 2 or 4 (a block straddles at most two shards), every window once an epoch,
    and the samples stay pure functions of (seed, index)."""
    touched = {}
    for groups in (0, 1, 2):
        ds = TokenDataset(byte_data, "train", seq_len=32, seed=1, shuffle_shards=groups)
        steps = range(0, ds.num_windows - 16, 16)
        touched[groups] = max(len(ds.shards_of(range(s, s + 16))) for s in steps)
        assert sorted(ds.window_of(i) for i in range(ds.num_windows)) == list(range(ds.num_windows))
        again = TokenDataset(byte_data, "train", seq_len=32, seed=1, shuffle_shards=groups)
        assert np.array_equal(ds.batch(40, 8).numpy(), again.batch(40, 8).numpy())
    assert len(TokenDataset(byte_data, "train", 32).shards) >= 5
    assert touched[0] >= 5 and touched[1] <= 2 and touched[2] <= 4, touched
    with pytest.raises(UserError, match="shuffle_shards=-1 must be >= 0"):
        TokenDataset(byte_data, "train", 32, shuffle_shards=-1)
