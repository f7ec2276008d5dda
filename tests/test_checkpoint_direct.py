"""Resume reads an item's bytes straight into the live tensor where it can
(triaxis.checkpoint.direct_read), and through DCP's torch.load everywhere else: both give the
values plain DCP gives, every byte is still verified, and a corrupted item is still named."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from triaxis.checkpoint import dcp_io, direct_read
from triaxis.checkpoint.safe_load import SafeLoadPlanner
from triaxis.errors import UserError


def _save(path: Path, state: dict) -> dict:
    w = dcp_io.writer(str(path))
    dcp.save(state, storage_writer=w)
    return json.loads(json.dumps(w.digests))  # the manifest's file table, as stored


def _load(path: Path, digests: dict, live: dict):
    r = dcp_io.reader(str(path), digests)
    dcp.load(live, storage_reader=r, planner=SafeLoadPlanner())
    return r


def _plain(path: Path, live: dict) -> dict:
    dcp.load(live, storage_reader=dcp.FileSystemReader(str(path)))
    return live


STATE = {
    "w": torch.randn(300, 40),
    "bf16": torch.randn(17).bfloat16(),
    "step": torch.tensor(7),
    "flag": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4),
}


def _zeros(state: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def test_plain_destinations_are_filled_directly_with_the_saved_bytes(tmp_path):
    digests = _save(tmp_path / "c", STATE)
    live = _zeros(STATE)
    before = {k: v.data_ptr() for k, v in live.items()}
    r = _load(tmp_path / "c", digests, live)
    # Every item but the empty tensor's (DCP plans no read for a tensor without bytes).
    assert r.direct_items == sum(v.numel() > 0 for v in STATE.values())
    for k, v in STATE.items():
        assert torch.equal(live[k], v), k
        assert live[k].data_ptr() == before[k]  # filled in place, not replaced


def _fallback_cases():
    """(name, live state, expected) where the direct path must step aside."""
    w = STATE["w"]
    wide = torch.zeros(40, 300).t()  # non-contiguous destination of the saved shape
    return [
        ("non_contiguous", {"w": wide}, {"w": w}),
        ("another_dtype", {"w": torch.zeros(300, 40, dtype=torch.float64)}, {"w": w.double()}),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _fallback_cases()])
def test_other_destinations_go_through_dcp_and_equal_plain_dcp(name, tmp_path):
    digests = _save(tmp_path / "c", {"w": STATE["w"]})
    _, live, want = next(c for c in _fallback_cases() if c[0] == name)
    r = _load(tmp_path / "c", digests, live)
    assert r.direct_items == 0
    plain = _plain(tmp_path / "c", {k: torch.zeros_like(v) for k, v in live.items()})
    for k in want:
        assert torch.equal(live[k], want[k]) and torch.equal(live[k], plain[k])


def test_a_corrupted_item_read_directly_is_named(tmp_path):
    digests = _save(tmp_path / "c", STATE)
    data = tmp_path / "c" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    # Flip a byte inside w's storage record: the part the direct path reads into the tensor.
    needle = STATE["w"].reshape(-1)[100:104].numpy().tobytes()
    at = bytes(raw).index(needle)
    raw[at] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        dcp_io.load(_zeros(STATE), str(tmp_path / "c"), digests, no_dist=True)
    assert "__0_0.distcp fails its checksum" in str(e.value) and "\n" not in str(e.value)


# -- several threads read one file ----------------------------------------------------------------
MANY = {f"t{i}": torch.randn(64, 16 + i) for i in range(9)}


def test_groups_are_contiguous_runs_of_about_equal_bytes():
    class Md:
        def __init__(self, offset, length):
            self.offset, self.length = offset, length

    lengths = [5, 1, 1, 1, 4, 2, 2, 8, 1, 3]
    items, at = [], 0
    for n in lengths:
        items.append((None, Md(at, n), None))
        at += n
    for k in (1, 2, 3, 4, 16):
        groups = direct_read._groups(items, k)
        assert [x for g in groups for x in g] == items  # every item once, in file order
        assert 1 <= len(groups) <= min(k, len(items)) and all(groups)
        if k > 1:
            assert len(groups) > 1  # the point: more than one reader
    assert direct_read._groups([], 4) == [[]]


@pytest.mark.parametrize("readers", [1, 3])
def test_several_readers_fill_every_item_in_place(tmp_path, monkeypatch, readers):
    monkeypatch.setattr(direct_read.DirectReadMixin, "readers", readers)
    digests = _save(tmp_path / "c", MANY)
    live = _zeros(MANY)
    before = {k: v.data_ptr() for k, v in live.items()}
    threads = set()
    real = direct_read.DirectReadMixin._read_group

    def spy(self, path, items):
        threads.add(threading.get_ident())
        return real(self, path, items)

    monkeypatch.setattr(direct_read.DirectReadMixin, "_read_group", spy)
    r = _load(tmp_path / "c", digests, live)
    assert r.direct_items == len(MANY) and len(threads) == readers
    for k, v in MANY.items():
        assert torch.equal(live[k], v) and live[k].data_ptr() == before[k], k


@pytest.mark.parametrize("name", sorted(MANY))
def test_a_corrupted_item_is_named_whichever_reader_reads_it(tmp_path, monkeypatch, name):
    monkeypatch.setattr(direct_read.DirectReadMixin, "readers", 3)
    digests = _save(tmp_path / "c", MANY)
    data = tmp_path / "c" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    at = bytes(raw).index(MANY[name].reshape(-1)[5:9].numpy().tobytes())
    raw[at] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        dcp_io.load(_zeros(MANY), str(tmp_path / "c"), digests, no_dist=True)
    assert "__0_0.distcp fails its checksum" in str(e.value)
