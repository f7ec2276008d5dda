"""The memory tier's shard store: step -> rank -> a shard file in a directory on a tmpfs, the
newest `keep` steps, at most `max_bytes` (triaxis.checkpoint.keeper serves it to the workers,
triaxis.checkpoint.buddy holds the previous node's replicas in one)."""

from __future__ import annotations

import mmap
import os
import threading

from triaxis.checkpoint import checksum


def _digest(data) -> int:
    return checksum.digest(checksum.WRITE, data)


def _map(path: str):
    """A private (copy-on-write) map of a shard file: writable for torch.frombuffer, no copy."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)


class ShardStore:
    """step -> rank -> (file, size, digest) under `directory`, newest `keep` steps, at most
    `max_bytes` in all. Workers write into `incoming/`; the store adopts (renames) from there."""

    def __init__(self, directory: str, keep: int, max_bytes: int, recycle: bool = False) -> None:
        if keep < 1 or max_bytes < 1:
            raise ValueError(f"keep={keep}, max_bytes={max_bytes}: both must be >= 1")
        self.dir, self.keep, self.max_bytes = os.path.realpath(directory), keep, max_bytes
        self.recycle = recycle
        """Keep each rank's evicted shard as incoming/spare-RANK for its next shard to be
        written into: its tmpfs pages exist already (the step in flight of footprint_bytes)."""
        self.incoming = os.path.join(self.dir, "incoming")
        os.makedirs(self.incoming, mode=0o700, exist_ok=True)
        self._steps: dict[int, dict[int, tuple[str, int, int]]] = {}
        self._lock = threading.Lock()
        self.on_adopt = None
        """Called as on_adopt(step, rank, path, digest) after each shard is held (the buddy
        replica's hook)."""

    def held_bytes(self) -> int:
        return sum(n for ranks in self._steps.values() for _, n, _ in ranks.values())

    def put(self, step: int, rank: int, data, digest: int) -> str | None:
        """Store a shard given as bytes (a peer that cannot write into this directory)."""
        path = os.path.join(self.incoming, f"{step}-{rank}-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:  # a full tmpfs: not held (the sender goes on)
            _unlink(path)
            return f"step {step} rank {rank}: cannot write {path}: {e.strerror or e}"
        return self.adopt(step, rank, path, digest, check=True)  # bytes from elsewhere

    def adopt(
        self, step: int, rank: int, path: str, digest: int, check: bool = False
    ) -> str | None:
        """Take the shard a worker on this node wrote at `path` (inside incoming/); the reason
        it was refused (the file is then removed), or None. Its checksum is checked when it is
        read back (`get`, the client's map), not here (`check`: here too): it was computed
        from the very tensors written, in this host's memory, a moment ago."""
        real = os.path.realpath(path)
        if os.path.dirname(real) != self.incoming or not os.path.isfile(real):
            return f"step {step} rank {rank}: {path} is not a file in {self.incoming}"
        err = self._adopt(step, rank, real, digest, check)
        if err is not None:
            _unlink(real)
        return err

    def _adopt(
        self, step: int, rank: int, path: str, digest: int, check: bool = True
    ) -> str | None:
        if check:
            data = _map(path)
            if _digest(data) != digest:
                return f"step {step} rank {rank}: checksum mismatch on arrival"
        size = os.path.getsize(path)
        with self._lock:
            if self._steps and step < min(self._steps) and len(self._steps) >= self.keep:
                return f"step {step} is older than the {self.keep} steps held"
            # What would be held: this shard in, the steps beyond `keep` out. A refused shard
            # must not have evicted anything (the older copy is then the newest one held).
            after = sorted({*self._steps, step})[-self.keep :]
            held = sum(
                n
                for s, ranks in self._steps.items()
                if s in after
                for r, (_, n, _) in ranks.items()
                if (s, r) != (step, rank)
            )
            if held + size > self.max_bytes:
                return (
                    f"step {step} rank {rank}: {size} more bytes exceed max_bytes={self.max_bytes}"
                )
            final = os.path.join(self.dir, f"{step}-{rank}.raw")
            os.replace(path, final)
            self._steps.setdefault(step, {})[rank] = (final, size, digest)
            for old in [s for s in self._steps if s not in after]:
                for r, (f, _, _) in self._steps.pop(old).items():
                    if self.recycle:
                        os.replace(f, os.path.join(self.incoming, f"spare-{r}"))
                    else:
                        _unlink(f)
        if self.on_adopt is not None:
            self.on_adopt(step, rank, final, digest)
        return None

    def locate(self, step: int, rank: int) -> tuple[str, int] | None:
        """(file, digest) of a held shard; the reader checks the digest."""
        with self._lock:
            entry = self._steps.get(step, {}).get(rank)
        return None if entry is None else (entry[0], entry[2])

    def get(self, step: int, rank: int):
        """The bytes of a held shard that still match its digest (a map), else None."""
        found = self.locate(step, rank)
        if found is None:
            return None
        try:
            data = _map(found[0])
        except OSError:
            return None  # evicted meanwhile
        return data if _digest(data) == found[1] else None  # rotted in memory: as good as none

    def steps(self) -> dict[int, list[int]]:
        with self._lock:
            return {s: sorted(r) for s, r in self._steps.items()}

    def corrupt(self, step: int, rank: int) -> None:
        """Flip a byte of a held shard (tests and drills: the next-tier path)."""
        with self._lock:
            path = self._steps[step][rank][0]
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
