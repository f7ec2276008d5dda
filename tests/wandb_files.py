"""Read W&B's offline run files (RUN_DIR/wandb/offline-run-*/run-ID.wandb) without wandb-core:
a 7-byte header, then LevelDB-log blocks of 32 KiB holding protobuf Records."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def run_files(run_dir: Path) -> tuple[set[str], dict, list[tuple[int, dict]]]:
    """(the run ids, the config as logged, [(step, {key: value})] over every offline run folder
    in order), leaving out W&B's own underscore keys."""
    ids, config, rows = set(), {}, []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for rec in records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                row = {
                    i.key or ".".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
                rows.append(
                    (rec.history.step.num, {k: v for k, v in row.items() if not k.startswith("_")})
                )
    return ids, config, rows


def run_files_through(run_dir: Path, step: int, timeout_s: float):
    """run_files once they hold `step`, or as they are after timeout_s: W&B's service process
    (wandb-core) may still be writing a run's file after `finish()` has returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = run_files(run_dir)
        if any(s == step for s, _ in got[2]) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)
