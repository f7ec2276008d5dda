"""Each rank's Flight Recorder records, written to the run folder when the watchdog fires.

torch's Flight Recorder (on when `TORCH_FR_BUFFER_SIZE`, or the older
`TORCH_NCCL_TRACE_BUFFER_SIZE`, is above 0 when the process groups are made) keeps the last N
collectives each rank *entered*, NCCL's and, since torch 2.11, gloo's: group, sequence number,
op, shapes, and whether it finished. Which rank never entered collective k is what names a
hang; a rank's Python stack cannot (under NCCL the rank "in" a collective may be fine).

The records go out as JSON (torch's own `_dump_fr_trace_json`), never torch's pickle dump:
`triaxis debug hang` reads files that other processes wrote. Beside them, each rank writes the
members of every group it belongs to: gloo's records name a group but not its ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FLIGHT_DIR = "flight_recorder"
"""The dumps' folder inside the run folder: one `rank_R.json` per rank."""
ENV_VARS = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")


def enabled() -> bool:
    """Whether this process's groups record (the variable is read as each group is made)."""
    for name in ENV_VARS:
        text = os.environ.get(name, "")
        if text:
            try:
                return int(text) > 0
            except ValueError:
                return False
    return False


def group_members() -> dict[str, dict]:
    """{group name: {"desc", "ranks" (global)}} for every group this rank belongs to."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return {}
    world = dist.distributed_c10d._world
    out: dict[str, dict] = {}
    for pg, name in list(world.pg_names.items()):
        ranks = world.pg_group_ranks.get(pg)
        if ranks is None:
            continue
        out[str(name)] = {
            "desc": str(getattr(pg, "group_desc", "") or ""),
            "ranks": sorted(int(r) for r in ranks),
        }
    return out


def discard(run_dir: str | Path, rank: int) -> None:
    """Remove this rank's dump of an earlier hang as a run starts in the folder: a later hang
    that this rank does not answer must not be judged on its old records."""
    (Path(run_dir) / FLIGHT_DIR / f"rank_{rank}.json").unlink(missing_ok=True)


def dump(run_dir: str | Path, rank: int) -> Path | None:
    """Write this rank's records; None when the recorder is off or torch cannot dump. Written
    to a temporary name and renamed: a reader never sees half a file."""
    if not enabled():
        return None
    import torch._C._distributed_c10d as c10d

    # Two recorders: NCCL's (CUDA events; `_dump_nccl_trace_json`, in CUDA builds) and the
    # one gloo and the other backends use (`_dump_fr_trace_json`). One file holds both.
    records: dict = {}
    for name in ("_dump_fr_trace_json", "_dump_nccl_trace_json"):
        dump_json = getattr(c10d, name, None)
        if dump_json is None:
            continue
        # Every record, finished or not (True, False): the last one a rank entered is what
        # counts. The JSON form carries no Python stacks; the analysis needs none.
        raw = dump_json(True, False)
        part = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        entries = records.get("entries", []) + list(part.get("entries") or [])
        records = {**part, **records, "entries": entries}
    if not records:
        return None
    records["triaxis"] = {"rank": rank, "groups": group_members()}
    folder = Path(run_dir) / FLIGHT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank_{rank}.json"
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(records))
    os.replace(tmp, path)
    return path
