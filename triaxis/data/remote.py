"""Shards of remote (s3://) prepared data: a local cache bounded in bytes, least recently used
out, filled by background prefetch.

Each process keeps its own cache folder, `<cache_dir>/triaxis-cache-<host>-<pid>-<random>/`,
removed when the dataset is closed or garbage-collected and at interpreter exit; a folder left
by a killed process (its pid gone on this host) is removed by the next cache that starts in the
same cache_dir. A shard is downloaded with ranged reads into a temporary file, checked against
the manifest's size and sha256, then renamed into place: a partial or corrupted download is
never read. Cached shards are memory-mapped like local ones.

Budget: every cached shard and every download in flight counts its full size against
`budget_bytes`. A prefetch never evicts a shard that was prefetched and not yet read (it is
skipped instead); a read that misses evicts the least recently used shards it needs to.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triaxis import storage
from triaxis.errors import UserError

_RANGE_BYTES = 8 * 2**20
"""One ranged GET of a shard download (and the most a download holds in memory)."""


@dataclass
class CacheStats:
    hits: int = 0
    """Reads served from a shard already in the cache."""
    waits: int = 0
    """Reads that waited for a download already in flight (a prefetch that came late)."""
    misses: int = 0
    """Reads that had to download the shard themselves."""
    evictions: int = 0
    prefetch_skipped: int = 0
    """Prefetches not started because the budget was full of shards not yet read."""
    downloaded_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        reads = self.hits + self.waits + self.misses
        return self.hits / reads if reads else 0.0


class ShardCache:
    """Shards `files[i]` of the prefix `base`, each of `sizes_bytes[i]` with digest `sha256[i]`."""

    def __init__(
        self,
        base: str,
        files: list[str],
        sizes_bytes: list[int],
        sha256: list[str],
        dtype: np.dtype,
        cache_dir: str = "",
        budget_bytes: int = 4 * 2**30,
        threads: int = 4,
    ):
        largest = max(sizes_bytes)
        if budget_bytes < largest:
            raise UserError(
                f"data.cache_gib={budget_bytes / 2**30:.3g} is smaller than the "
                f"largest shard of {base} ({largest / 2**30:.3g} GiB); raise "
                f"data.cache_gib to at least {2 * largest / 2**30:.3g}"
            )
        self.base, self.files, self.sizes, self.sha256 = base, files, sizes_bytes, sha256
        self.dtype, self.budget_bytes = dtype, budget_bytes
        self.cache_root = cache_dir or tempfile.gettempdir()
        self.stats = CacheStats()
        self._cond = threading.Condition()
        self._entries: OrderedDict[int, np.ndarray] = OrderedDict()  # LRU first
        self._inflight: dict[int, Future] = {}
        self._unread: set[int] = set()  # prefetched, not yet read: prefetch may not evict them
        self._used_bytes = 0
        self._folder: list[Path | None] = [None]  # made at the first download
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="triaxis-prefetch")
        # Runs on close(), on garbage collection or at exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _close, self._pool, self._folder)

    # -- reading ------------------------------------------------------------------------------
    def get(self, shard: int) -> np.ndarray:
        """The shard's tokens, memory-mapped from the cache (downloaded first if needed)."""
        with self._cond:
            while True:
                arr = self._entries.get(shard)
                if arr is not None:
                    self._entries.move_to_end(shard)
                    self._unread.discard(shard)
                    self.stats.hits += 1
                    return arr
                future = self._inflight.get(shard)
                if future is not None:
                    self.stats.waits += 1
                    run_here = False
                    break
                future = self._start(shard, prefetch=False)
                if future is not None:  # None: another thread started it meanwhile
                    self.stats.misses += 1
                    run_here = True
                    break
        if run_here:
            self._download(shard, future)
        arr = future.result()
        with self._cond:
            self._unread.discard(shard)
            if shard in self._entries:
                self._entries.move_to_end(shard)
        return arr

    def prefetch(self, shards: list[int]) -> None:
        """Download these shards in the background, in this order, as the budget allows."""
        for shard in shards:
            with self._cond:
                if shard in self._entries or shard in self._inflight:
                    continue
                future = self._start(shard, prefetch=True)
                if future is None:
                    self.stats.prefetch_skipped += 1
                    continue
            self._pool.submit(self._download, shard, future)

    @property
    def folder(self) -> Path | None:
        return self._folder[0]

    def close(self) -> None:
        """Stop the prefetch threads and remove the cache folder."""
        self._finalizer()

    # -- internals (the lock is held where noted) ----------------------------------------------
    def _start(self, shard: int, prefetch: bool) -> Future | None:
        """Reserve the shard's bytes and register its download (lock held). None: a prefetch
        that would have to evict unread prefetched shards, or a read that, while it waited for
        room, saw another thread start the same shard."""
        size = self.sizes[shard]
        while self._used_bytes + size > self.budget_bytes:
            victims = [s for s in self._entries if not (prefetch and s in self._unread)]
            if victims:
                self._evict(victims[0])
            elif prefetch:
                return None
            else:
                # Everything is in flight: wait for a download to land, then evict it.
                self._cond.wait()
                if shard in self._entries or shard in self._inflight:
                    return None
        self._used_bytes += size
        future: Future = Future()
        self._inflight[shard] = future
        if prefetch:
            self._unread.add(shard)
        return future

    def _evict(self, shard: int) -> None:
        """Drop a cached shard (lock held). Arrays already handed out stay valid: the mapping
        outlives the unlinked file."""
        del self._entries[shard]
        self._unread.discard(shard)
        self._used_bytes -= self.sizes[shard]
        self.stats.evictions += 1
        (self._ensure_folder() / self.files[shard]).unlink(missing_ok=True)

    def _download(self, shard: int, future: Future) -> None:
        try:
            arr = self._fetch_verified(shard)
        except BaseException as err:
            with self._cond:
                del self._inflight[shard]
                self._unread.discard(shard)
                self._used_bytes -= self.sizes[shard]
                self._cond.notify_all()
            future.set_exception(err)
            return
        with self._cond:
            del self._inflight[shard]
            self._entries[shard] = arr
            self.stats.downloaded_bytes += self.sizes[shard]
            self._cond.notify_all()
        future.set_result(arr)

    def _fetch_verified(self, shard: int) -> np.ndarray:
        name, uri = self.files[shard], storage.join(self.base, self.files[shard])
        try:
            actual = storage.size(uri)
        except FileNotFoundError:
            raise UserError(
                f"shard {uri} listed in the manifest is missing; prepare the data "
                f"again (triaxis prepare --output {self.base})"
            ) from None
        if actual != self.sizes[shard]:
            raise UserError(
                f"shard {uri} has {actual} bytes but the manifest says "
                f"{self.sizes[shard]}: it was truncated or overwritten; prepare the "
                f"data again (triaxis prepare --output {self.base})"
            )
        folder = self._ensure_folder()
        for _attempt in range(2):  # a second try rules out corruption in transit
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as f:
                    for start in range(0, actual, _RANGE_BYTES):
                        data = storage.read_bytes(uri, start, min(start + _RANGE_BYTES, actual))
                        digest.update(data)
                        f.write(data)
                if digest.hexdigest() == self.sha256[shard]:
                    final = folder / name
                    os.replace(tmp, final)  # readers never see a partial shard
                    return np.memmap(final, dtype=self.dtype, mode="r")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        raise UserError(
            f"shard {uri} fails its sha256 check (got {digest.hexdigest()[:12]}..., "
            f"the manifest says {self.sha256[shard][:12]}...): the object is "
            f"corrupted or was overwritten after prepare; prepare the data again "
            f"(triaxis prepare --output {self.base})"
        )

    def _ensure_folder(self) -> Path:
        with self._cond:
            if self._folder[0] is None:
                root = Path(self.cache_root)
                root.mkdir(parents=True, exist_ok=True)
                sweep_stale(root)
                self._folder[0] = Path(
                    tempfile.mkdtemp(dir=root, prefix=f"triaxis-cache-{_host()}-{os.getpid()}-")
                )
            return self._folder[0]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def _close(pool: ThreadPoolExecutor, folder: list) -> None:
    # The last reference may drop in a prefetch thread, which cannot wait for itself.
    in_pool = threading.current_thread() in getattr(pool, "_threads", ())
    pool.shutdown(wait=not in_pool, cancel_futures=True)
    if folder[0] is not None:
        shutil.rmtree(folder[0], ignore_errors=True)


def sweep_stale(root: Path) -> list[Path]:
    """Remove cache folders under `root` left by processes of this host that no longer run."""
    removed = []
    pattern = re.compile(rf"triaxis-cache-{re.escape(_host())}-(\d+)-")
    for entry in root.iterdir() if root.is_dir() else []:
        m = pattern.match(entry.name)
        if not m or not entry.is_dir() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
