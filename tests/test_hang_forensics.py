"""Which rank hung, from torch's Flight Recorder alone (issue 27, item 4): the analyzer on
synthetic records, then real hangs injected with TRIAXIS_FAULT_HANG, where the verdict is read
from the dumps (`triaxis debug hang`), not from Python stacks."""

import json

import pytest

from tests.helpers import triaxis
from tests.test_failures import launch
from triaxis.errors import UserError
from triaxis.metrics import hang


def _entry(group, seq, op="gloo:all_reduce", retired=True, sizes=((4, 8),), desc="default_pg"):
    return {
        "collective_seq_id": seq,
        "is_p2p": False,
        "process_group": [group, desc],
        "profiling_name": op,
        "input_sizes": [list(s) for s in sizes],
        "input_dtypes": ["Float"] * len(sizes),
        "retired": retired,
        "state": "scheduled",
    }


def _dump(rank, entries, groups):
    return {"entries": entries, "triaxis": {"rank": rank, "groups": groups}}


WORLD4 = {"0": {"desc": "default_pg", "ranks": [0, 1, 2, 3]}}


def test_names_the_rank_that_never_entered():
    dumps = {
        r: _dump(r, [_entry("0", 1), _entry("0", 2), _entry("0", 3, retired=False)], WORLD4)
        for r in (0, 1, 2)
    }
    dumps[3] = _dump(3, [_entry("0", 1), _entry("0", 2)], WORLD4)  # stuck outside collectives
    (f,) = hang.analyze(dumps)
    assert (f.seq, f.behind, f.root) == (3, {3: 2}, True)
    assert sorted(f.waiting) == [0, 1, 2]
    line = hang.verdict(dumps, 4)
    assert line.startswith("rank 3 (last #2) never entered collective #3 on group 0 ")
    assert "rank(s) [0, 1, 2] in gloo:all_reduce [[4, 8]] Float wait in it" in line


def test_a_member_without_a_dump_that_others_wait_for():
    """A rank whose process froze whole (or was killed) writes no dump; its peers' open
    collective still points at it."""
    dumps = {r: _dump(r, [_entry("0", 1), _entry("0", 2, retired=False)], WORLD4) for r in (0, 2)}
    dumps[3] = _dump(3, [_entry("0", 1), _entry("0", 2, retired=False)], WORLD4)
    line = hang.verdict(dumps, 4)
    assert line.startswith("rank 1 (no dump) never entered collective #2 on group 0 "), line
    assert "(no dump from rank(s) [1]: they did not answer)" in line


def test_cascade_points_at_the_root():
    """Rank 0 stopped outside collectives: behind on groups "1" and "2", a root on both. Once
    rank 0 waits in group 1's #5 itself, its lag on group 2 is only a cascade."""
    groups = {
        "1": {"desc": "dp", "ranks": [0, 1]},
        "2": {"desc": "tp", "ranks": [0, 2]},
    }
    dumps = {
        0: _dump(0, [_entry("1", 4), _entry("2", 7)], groups),  # done, then stuck elsewhere
        1: _dump(1, [_entry("1", 4), _entry("1", 5, retired=False)], groups),
        2: _dump(2, [_entry("2", 7), _entry("2", 8, op="gloo:allgather", retired=False)], groups),
    }
    findings = hang.analyze(dumps)
    assert [(f.group.split()[0], f.behind, f.root) for f in findings] == [
        ("1", {0: 4}, True),
        ("2", {0: 7}, True),
    ]
    # Now rank 0 waits in group 1's #5 while behind on group 2: group 2 is a cascade.
    dumps[0]["entries"].append(_entry("1", 5, retired=False))
    (f,) = hang.analyze(dumps)[:1]
    assert f.behind == {0: 7} and f.root is False


def test_mismatch_and_nothing_found():
    groups = {"0": {"desc": "default_pg", "ranks": [0, 1]}}
    dumps = {
        0: _dump(0, [_entry("0", 1, retired=False)], groups),
        1: _dump(1, [_entry("0", 1, op="gloo:broadcast", retired=False)], groups),
    }
    assert "ranks disagree" in hang.verdict(dumps, 2)
    calm = {r: _dump(r, [_entry("0", 1)], groups) for r in (0, 1)}
    assert hang.verdict(calm, 3).startswith("no group has a rank behind")
    assert "no dump from rank(s) [2]" in hang.verdict(calm, 3)


def test_load_refuses_what_is_not_a_dump(tmp_path):
    with pytest.raises(UserError, match="no Flight Recorder dumps; run with TORCH_FR_BUFFER"):
        hang.load(tmp_path)
    (tmp_path / "flight_recorder").mkdir()
    (tmp_path / "flight_recorder" / "rank_0.json").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match="not a Flight Recorder JSON dump"):
        hang.load(tmp_path)
    proc = triaxis("debug", "hang", tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


FR_ENV = {"TORCH_FR_BUFFER_SIZE": "2000"}


def _hung(byte_data, run, nproc, fault, *extra):
    proc = launch(
        byte_data,
        run,
        nproc,
        "--train.hang_timeout_s=5",
        *extra,
        env={**FR_ENV, "TRIAXIS_FAULT_HANG": fault},
        timeout=400,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Flight Recorder (" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "flight_recorder").iterdir()) == [
        f"rank_{r}.json" for r in range(nproc)
    ]
    # The verdict from the dumps alone (no stacks in them), as a user gets it afterwards.
    out = triaxis("debug", "hang", run).stdout
    return proc, out


@pytest.mark.slow
def test_forward_hang_at_world_4(byte_data, tmp_path):
    proc, out = _hung(byte_data, tmp_path / "run", 4, "1:forward@3")
    first = out.splitlines()[0]
    assert "rank 1 (last #" in first and "never entered collective #" in first, out
    assert "rank(s) [0, 2, 3] in " in first, out
    for r in (0, 2, 3):
        assert f"rank {r} (last" not in first, out
    assert "rank 1 (last #" in proc.stderr  # the launcher's line says the same


@pytest.mark.slow
def test_hang_inside_a_pipeline_stage(byte_data, tmp_path):
    """pp=2 x dp_shard=2: rank 2 stops before its stage runs; its stage's data-parallel peer
    waits for it in FSDP's all-gather (gloo records no send/recv: the other stage's wait in a
    pipeline receive is not seen, and needs not be)."""
    _, out = _hung(
        byte_data, tmp_path / "run", 4, "2:forward@3", "--parallel.pp=2", "--parallel.dp_shard=2"
    )
    first = out.splitlines()[0]
    assert "rank 2 (last #" in first and "never entered" in first, out
    for r in (0, 1, 3):
        assert f"rank {r} (last" not in first, out


@pytest.mark.slow
def test_hang_in_the_checkpoint_agreement(byte_data, tmp_path):
    _, out = _hung(byte_data, tmp_path / "run", 2, "1:checkpoint@4")
    first = out.splitlines()[0]
    assert first.count("never entered") == 1 and "rank 1 (last #" in first, out
    assert "on group " in first and "(triaxis_host:checkpoint_agreement, ranks 0,1)" in first
    assert "rank(s) [0] in " in first, out
    dump0 = json.loads((tmp_path / "run" / "flight_recorder" / "rank_0.json").read_text())
    assert "frames" not in json.dumps(dump0)  # no Python stacks were used


def test_a_new_run_discards_its_ranks_old_dumps(tmp_path, monkeypatch):
    from triaxis.train.watchdog import Watchdog

    folder = tmp_path / "flight_recorder"
    folder.mkdir()
    for r in (0, 1):
        (folder / f"rank_{r}.json").write_text("{}")
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "2000")
    dog = Watchdog(60, 1, 2, str(tmp_path))
    dog.start()
    dog.stop()
    assert sorted(p.name for p in folder.iterdir()) == ["rank_0.json"]  # only its own
