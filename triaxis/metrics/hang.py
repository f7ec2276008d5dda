"""Which rank hung, from the Flight Recorder dumps alone (`triaxis debug hang RUN_DIR`).

Every process group numbers its collectives 1, 2, 3... on every member (`collective_seq_id`).
When a job hangs, the members of a group that entered collective k wait in it for the ones
that never did: per group, k is the highest number any member entered, and the members whose
last record is below k are the ones behind. A rank behind on one group may itself be waiting
in another (a cascade); the root is a rank behind that waits in no collective at all. When
every member entered k but with different ops or shapes, the ranks disagree (a mismatch).

This reads JSON only (`metrics/flight.py` writes it): nothing another process wrote is
unpickled. It needs no Python stacks. Point-to-point sends and receives are not counted (gloo
records none), so a rank waiting only in a pipeline receive shows as not waiting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from triaxis.errors import UserError
from triaxis.metrics.flight import FLIGHT_DIR

MAX_DUMP_BYTES = 256 << 20
"""A dump larger than this is refused (the recorder keeps at most its buffer's entries)."""


@dataclass
class Finding:
    group: str
    """The group's name (the same on every member) and, after a space, its description."""
    seq: int
    """The collective's sequence number on that group."""
    behind: dict[int, int] = field(default_factory=dict)
    """{rank: the last sequence number it entered on the group, or -1 for a member that wrote
    no dump} for the ranks that never entered `seq` (as far as is known); empty for a
    mismatch."""
    waiting: dict[int, str] = field(default_factory=dict)
    """{rank: "op shapes dtypes"} for the ranks that entered `seq` and did not finish it."""
    root: bool = True
    """False when every rank behind waits in another collective itself (a cascade)."""

    def line(self) -> str:
        waits = _by_what(self.waiting)
        if not self.behind:
            return f"collective #{self.seq} on group {self.group}: ranks disagree: {waits}"
        behind = ", ".join(
            f"rank {r} ({f'last #{s}' if s >= 0 else 'no dump'})"
            for r, s in sorted(self.behind.items())
        )
        text = f"{behind} never entered collective #{self.seq} on group {self.group}"
        return text + (f"; {waits} wait in it" if waits else "")


def _by_what(waiting: dict[int, str]) -> str:
    groups: dict[str, list[int]] = {}
    for r, what in sorted(waiting.items()):
        groups.setdefault(what, []).append(r)
    return "; ".join(f"rank(s) {ranks} in {what}" for what, ranks in groups.items())


def load(run_dir: str | Path) -> dict[int, dict]:
    """{rank: its dump} from RUN_DIR/flight_recorder; bad input is one line."""
    folder = Path(run_dir) / FLIGHT_DIR
    if not folder.is_dir():
        raise UserError(
            f"{folder}: no Flight Recorder dumps; run with TORCH_FR_BUFFER_SIZE=2000 (and "
            "train.hang_timeout_s below train.dist_timeout_s) so that the watchdog writes them "
            "when a run hangs"
        )
    dumps: dict[int, dict] = {}
    for path in sorted(folder.glob("rank_*.json")):
        try:
            rank = int(path.stem.removeprefix("rank_"))
        except ValueError:
            continue
        if path.stat().st_size > MAX_DUMP_BYTES:
            raise UserError(f"{path}: larger than {MAX_DUMP_BYTES >> 20} MiB; not a dump")
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("entries", []), list):
                raise ValueError("no list of entries")
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a Flight Recorder JSON dump ({e})") from None
        dumps[rank] = data
    if not dumps:
        raise UserError(f"{folder}: no rank_R.json dumps in it")
    return dumps


def _what(entry: dict) -> str:
    sizes = entry.get("input_sizes") or []
    dtypes = sorted(set(entry.get("input_dtypes") or []))
    return f"{entry.get('profiling_name', '?')} {sizes} {'/'.join(dtypes)}".rstrip()


def _group_key(entry: dict) -> str:
    pg = entry.get("process_group") or ["?", ""]
    return str(pg[0])


def analyze(dumps: dict[int, dict]) -> list[Finding]:
    """The findings, roots first. Empty when no group shows a rank behind or a mismatch."""
    members: dict[str, list[int]] = {}
    descs: dict[str, str] = {}
    last: dict[int, dict[str, int]] = {}
    entered: dict[tuple[int, str, int], dict] = {}
    open_on: dict[int, set[str]] = {}  # the groups where each rank waits in a collective
    for rank, dump in dumps.items():
        for name, group in ((dump.get("triaxis") or {}).get("groups") or {}).items():
            members.setdefault(name, list(group.get("ranks") or []))
            descs.setdefault(name, group.get("desc") or "")
        last[rank], open_on[rank] = {}, set()
        for e in dump.get("entries") or []:
            if e.get("is_p2p"):
                continue
            name, seq = _group_key(e), int(e.get("collective_seq_id") or 0)
            descs.setdefault(name, str((e.get("process_group") or ["", ""])[1] or ""))
            last[rank][name] = max(seq, last[rank].get(name, 0))
            entered[(rank, name, seq)] = e
            if _open(e):
                open_on[rank].add(name)
    for name in {n for r in last.values() for n in r}:  # groups no dump described
        members.setdefault(name, sorted(r for r in last if name in last[r]))
    findings: list[Finding] = []
    for name, ranks in sorted(members.items()):
        seen = [r for r in ranks if r in dumps]
        if len(seen) < 2:
            continue
        k = max(last[r].get(name, 0) for r in seen)
        if k == 0:
            continue
        label = f"{name} ({descs[name]}, ranks {_span(ranks)})" if descs.get(name) else name
        at_k = {r: entered[(r, name, k)] for r in seen if (r, name, k) in entered}
        waiting = {r: _what(e) for r, e in at_k.items() if name in open_on[r] and _open(e)}
        behind = {r: last[r].get(name, 0) for r in seen if last[r].get(name, 0) < k}
        if waiting:  # a member without a dump, waited for: most likely it never came
            behind.update({r: -1 for r in ranks if r not in dumps})
        if behind:
            root = any(not open_on.get(r) for r in behind)
            findings.append(Finding(label, k, behind, waiting, root))
        elif len({_what(e) for e in at_k.values()}) > 1 and waiting:
            findings.append(Finding(label, k, {}, {r: _what(e) for r, e in at_k.items()}))
    return sorted(findings, key=lambda f: (not f.root, not f.behind, f.group))


def _open(entry: dict) -> bool:
    return not entry.get("retired", True) and entry.get("state") != "completed"


def _span(ranks: list[int]) -> str:
    ranks = sorted(ranks)
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def verdict(dumps: dict[int, dict], world_size: int | None = None) -> str:
    """One line: the root findings (or every finding when none is a root), and the ranks
    that wrote no dump."""
    findings = analyze(dumps)
    roots = [f for f in findings if f.root and f.behind] or findings
    if roots:
        text = "; ".join(f.line() for f in roots)
    else:
        text = (
            "no group has a rank behind and no collective is waiting: the hang is outside "
            "collectives on every rank that dumped (or the buffer is too small)"
        )
    missing = sorted(set(range(world_size or 0)) - set(dumps))
    if missing:
        text += f" (no dump from rank(s) {missing}: they did not answer)"
    return text


def world_size_of(dumps: dict[int, dict]) -> int:
    """The job's size as the dumps describe it (the widest group's highest rank + 1)."""
    ranks = set(dumps)
    for dump in dumps.values():
        for group in ((dump.get("triaxis") or {}).get("groups") or {}).values():
            ranks.update(group.get("ranks") or [])
    return max(ranks) + 1


def run_debug_hang(run_dir: str) -> int:
    dumps = load(run_dir)
    print(f"Flight Recorder ({len(dumps)} rank(s)): {verdict(dumps, world_size_of(dumps))}")
    for f in analyze(dumps):
        print(f"  {'root' if f.root else 'cascade'}: {f.line()}")
    return 0


def add_debug_parser(sub) -> None:
    """`triaxis debug hang RUN_DIR`."""
    p = sub.add_parser("debug", help="forensics over a run folder (debug hang RUN_DIR)")
    what = p.add_subparsers(dest="what", required=True)
    h = what.add_parser("hang", help="which rank hung, from the Flight Recorder dumps")
    h.add_argument("run_dir")
    h.set_defaults(fn=lambda a: run_debug_hang(a.run_dir))
