"""Checksums computed as DCP writes, checked as DCP reads: no file is ever read a second time
to hash it, and no more than a chunk of it is held for hashing.

A DCP data file is the concatenation of items (one `torch.save` blob per tensor shard or
value); DCP asks the stream for its position at each item's start and end. The writer's stream
wrapper cuts its running checksum there, so every item gets its own (offset, length, digest):
recorded per file in the rank's sidecar, then in the manifest. A loading rank reads only the
items it needs (a resharded or weights-only load reads parts of files), so checking is per item:
the reader's view of an item hashes the bytes `torch.load` pulls through it, in order, fills
the few bytes it skips (zip headers' padding), and at the end of the file reads the small tail
it read out of order (the zip directory). A mismatch fails the load naming the file.

The checksum is XXH3-64 for new checkpoints, zlib's CRC-32 for older ones (checksum.py; the
manifest names it). A tensor's bytes are read in 4 MiB chunks, each hashed right after it is
read, while it is still in the processor's cache: verification then adds no pass over memory,
only the hash's arithmetic (~10 GB/s). Measured in CPU time over a 0.6 GB resume (7 runs):
4 MiB chunks cost the same as plain DCP (1.15 s against 1.17 s), 1 MiB 1.23 s and 256 KiB
1.27 s (per-chunk calls); hashing on a helper thread behind the read cost 1.65-1.8 s (the
reading and hashing threads trade the GIL per chunk), and no less wall time on a loaded machine
(bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable

from triaxis.checkpoint import checksum, safe_load

_CHUNK = 1 << 20  # bytes hashed per read when filling gaps: the bound on memory for hashing
_GAP = 1 << 20  # a read further ahead than this is served unhashed and hashed at the end
_HOT = 4 << 20  # large reads and writes go in chunks of this size, each hashed while in cache
_KEEP = 256 << 10  # reads ahead of the hash up to this size are kept to be hashed later


def walk(err: BaseException):
    """`err` and every exception inside it: DCP wraps each rank's failure in a
    CheckpointException (a BaseException), possibly chained."""
    from torch.distributed.checkpoint.api import CheckpointException

    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, CheckpointException):
            todo.extend(exc for exc, _ in e.failures.values())
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def find_in(err: BaseException, kind: type) -> BaseException | None:
    return next((e for e in walk(err) if isinstance(e, kind)), None)


class ChecksumMismatch(Exception):
    def __init__(self, name: str, detail: str):
        super().__init__(f"{name} {detail}")
        self.name = name


# -- writing ------------------------------------------------------------------------------------
class _HashingStream(io.RawIOBase):
    """A write-only stream: passes bytes through, a checksum per segment between tell()
    calls."""

    def __init__(self, raw, done: Callable[[int, list], None]):
        super().__init__()
        self.raw, self.done = raw, done
        self.pos = self.start = 0
        self.hash = checksum.new(checksum.WRITE)
        self.segments: list[list[int]] = []
        self.finished = False

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        # torch.save hands over a tensor's whole storage in one call: written and hashed in
        # _HOT chunks, each hashed right after the write read it, while it is in the cache
        # (hashing the whole after writing it is a second pass over memory).
        mv = memoryview(b).cast("B")
        done = 0
        while done < len(mv):
            part = mv[done : done + _HOT]
            n = self.raw.write(part)
            n = len(part) if n is None else n
            self.hash.update(part[:n])
            done += n
            if n < len(part):  # a short write: the caller writes the rest again
                break
        self.pos += done
        return done

    def _cut(self) -> None:
        if self.pos > self.start:
            self.segments.append([self.start, self.pos - self.start, self.hash.intdigest()])
        self.start, self.hash = self.pos, checksum.new(checksum.WRITE)

    def tell(self) -> int:
        self._cut()  # DCP asks at every item boundary
        return self.pos

    def seek(self, *_):  # a rewrite would invalidate the running checksum
        raise io.UnsupportedOperation("checksummed checkpoint streams are append-only")

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        if not self.finished:
            self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._cut()
            self.raw.close()
            self.done(self.pos, self.segments)
        super().close()


class _FsProxy:
    """DCP's filesystem object with stream hooks; everything else passes through."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _HashingFs(_FsProxy):
    def __init__(self, inner, digests: dict):
        super().__init__(inner)
        self._digests = digests

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with self._inner.create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            name = os.path.basename(os.fspath(path))

            def done(size: int, segments: list) -> None:
                self._digests[name] = {"size": size, "items": segments}

            stream = _HashingStream(raw, done)
            try:
                yield stream
            except BaseException:
                # A failed write records nothing, ever: without this the stream's __del__
                # (IOBase closes on collection, maybe after a retry wrote the whole file)
                # would record the partial size and checksums.
                stream.finished = True
                raise
            stream.close()

    def rename(self, path, new_path) -> None:
        self._inner.rename(path, new_path)  # .metadata is written as a .tmp, then renamed
        old, new = (os.path.basename(os.fspath(p)) for p in (path, new_path))
        if old in self._digests:
            self._digests[new] = self._digests.pop(old)


def hashing(writer):
    """Make a DCP FileSystemWriter/FsspecWriter record {file: {size, items}} in
    `writer.digests` as it writes."""
    writer.digests = {}
    writer.fs = _HashingFs(writer.fs, writer.digests)
    return writer


# -- reading ------------------------------------------------------------------------------------
class _VerifyingView(io.IOBase):
    """One item of a data file, as DCP's own view presents it to torch.load, hashing what
    passes through."""

    def __init__(self, base, offset: int, length: int, want: int, name: str, algorithm: str):
        super().__init__()
        self.base, self.offset, self.len, self.want, self.name = base, offset, length, want, name
        self.hash = checksum.new(algorithm)
        self.hashed = 0  # bytes [0, hashed) of the item are in self.hash
        self.ahead: dict[int, bytes] = {}  # small reads served ahead of the hash (zip index)
        self.base.seek(offset)

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        if whence == os.SEEK_SET:  # the same arithmetic as DCP's _ReaderView
            offset = self.offset + offset
        elif whence == os.SEEK_END:
            whence, offset = os.SEEK_SET, self.offset + self.len - offset
        return self.base.seek(offset, whence)

    def tell(self) -> int:
        return self.base.tell() - self.offset

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _fill(self, upto: int) -> None:
        """Hash [hashed, upto), from what was already read ahead where it covers the range
        (no second request on S3), else by reading it; leaves the base stream at `upto`."""
        self.base.seek(self.offset + self.hashed)
        while self.hashed < upto:
            seen = next(
                ((p, d) for p, d in self.ahead.items() if p <= self.hashed < p + len(d)), None
            )
            if seen is not None:
                p, d = seen
                chunk = d[self.hashed - p : upto - p]
            else:
                nxt = min((p for p in self.ahead if p > self.hashed), default=upto)
                chunk = self.base.read(min(_CHUNK, min(nxt, upto) - self.hashed))
                if not chunk:
                    raise ChecksumMismatch(self.name, "is shorter than its manifest says")
            self.hash.update(chunk)
            self.hashed += len(chunk)
        self.base.seek(self.offset + upto)

    def _before(self, pos: int) -> None:
        if 0 < pos - self.hashed <= _GAP:  # a skipped header: hash it, then read on
            self._fill(pos)

    def _after(self, pos: int, data) -> None:
        n = len(data)
        if pos <= self.hashed < pos + n:
            self.hash.update(data[self.hashed - pos :])
            self.hashed = pos + n
        elif pos > self.hashed and n <= _KEEP:
            self.ahead[pos] = bytes(data)

    def readinto(self, b) -> int:
        pos = self.tell()
        self._before(pos)
        mv = memoryview(b).cast("B")[: max(0, self.len - pos)]
        if pos != self.hashed:  # ahead of the hash (the zip index): kept, or hashed at the end
            n = self.base.readinto(mv) or 0
            self._after(pos, mv[:n])
            return n
        done = 0
        while done < len(mv):
            n = self.base.readinto(mv[done : done + _HOT]) or 0
            if n == 0:
                break
            self._after(pos + done, mv[done : done + n])
            done += n
        return done

    def read(self, size: int = -1) -> bytes:
        pos = self.tell()
        self._before(pos)
        room = max(0, self.len - pos)
        data = self.base.read(room if size is None or size < 0 or size > room else size)
        self._after(pos, memoryview(data))
        return data

    def finish(self) -> None:
        self._fill(self.len)
        if self.hash.intdigest() != self.want:
            raise ChecksumMismatch(
                self.name, "fails its checksum (its bytes changed after they were written)"
            )


class _VerifyingFs(_FsProxy):
    def __init__(self, inner, reader):
        super().__init__(inner)
        self._reader = reader

    def unchecked_stream(self, path, mode: str):
        """A stream whose item views the caller verifies itself (the parallel direct reads,
        each thread on its own stream): create_stream's check on exit reads a list shared by
        the reader, which threads must not share."""
        return self._inner.create_stream(path, mode)

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with self._inner.create_stream(path, mode) as raw:
            yield raw
            # The file is still open: check every item read from it, in file order.
            views, self._reader._views = self._reader._views, []
            for view in sorted(views, key=lambda v: v.offset):
                view.finish()


class _VerifyingMixin:
    """Reader side. `expected` is the manifest's file table ({name: {size, items}}) with
    `algorithm` the checksum it records (checksum.of_manifest); None loads without checking
    (checkpoint.verify_on_resume=false, or a legacy checkpoint verified beforehand)."""

    def _setup_verify(self, expected: dict | None, where: str, algorithm: str) -> None:
        self._views: list[_VerifyingView] = []
        self._where, self._algorithm = where, algorithm
        self.failure: BaseException | None = None
        self._expected = (
            None
            if expected is None
            else {
                name: {off: (length, want) for off, length, want in entry.get("items", [])}
                for name, entry in expected.items()
            }
        )
        self._metadata_entry = None if expected is None else expected.get(".metadata")
        self.fs = _VerifyingFs(self.fs, self)

    def read_metadata(self):  # no **kwargs: DCP then never tries per-rank metadata files
        try:
            return self._read_metadata()
        except (safe_load.UnsafeMetadata, ChecksumMismatch) as err:
            self.failure = err  # DCP reports this one as a string in an AssertionError
            raise

    def _read_metadata(self):
        from torch.distributed.checkpoint.metadata import StorageMeta

        from triaxis.checkpoint import manifest as mf

        with self.fs.create_stream(self.fs.concat_path(self.path, ".metadata"), "rb") as f:
            raw = f.read()
        if self._metadata_entry is not None:
            want = self._metadata_entry
            got = checksum.digest(self._algorithm, raw)
            items = want.get("items") or [[0, len(raw), None]]
            if len(raw) != want["size"] or (items[0][2] is not None and items[0][2] != got):
                raise ChecksumMismatch(".metadata", "fails its checksum")
        md = safe_load.load_metadata(raw, f"{self._where}/.metadata")
        # Every file DCP will open must be a data file named in the manifest: a crafted
        # metadata must not send the reader outside the folder.
        for info in md.storage_data.values():
            rel = getattr(info, "relative_path", None)
            if (
                not isinstance(rel, str)
                or not mf.DATA_NAME.fullmatch(rel)
                or (self._expected is not None and rel not in self._expected)
            ):
                raise safe_load.UnsafeMetadata(
                    f"{self._where}/.metadata points at {rel!r}, which is not a data file of "
                    "this checkpoint; refusing to open it"
                )
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def _slice_file(self, file, sinfo):
        if self._expected is None:
            return super()._slice_file(file, sinfo)
        view = self._item_view(file, sinfo)
        self._views.append(view)  # checked when the file's stream closes (_VerifyingFs)
        return view

    def _item_view(self, file, sinfo) -> _VerifyingView:
        """A verifying view of one item of `file`; whoever takes it calls its finish()."""
        table = self._expected.get(sinfo.relative_path, {})
        length, want = table.get(sinfo.offset, (None, None))
        if length != sinfo.length:
            raise ChecksumMismatch(
                sinfo.relative_path,
                f"has no checksum for bytes {sinfo.offset}..{sinfo.offset + sinfo.length}",
            )
        if sinfo.length >= _HOT:  # a smaller item is one read already
            _read_ahead(file, sinfo.offset, sinfo.length)
        return _VerifyingView(
            file, sinfo.offset, sinfo.length, want, sinfo.relative_path, self._algorithm
        )


def _read_ahead(file, offset: int, length: int) -> None:
    """Have the kernel start reading a local item now. The view reads it in _HOT chunks,
    hashing each; from a cold page cache each chunk would otherwise wait for its own I/O, where
    one large read (plain DCP's) lets the disk stream."""
    try:
        fd = file.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return  # not a local file (S3): fsspec reads ahead on its own
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def reader_class(remote: bool):
    from torch.distributed.checkpoint import FileSystemReader

    if not remote:
        from triaxis.checkpoint.direct_read import DirectReadMixin

        class LocalReader(DirectReadMixin, _VerifyingMixin, FileSystemReader):
            pass

        return LocalReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class RemoteReader(_VerifyingMixin, FsspecReader):
        pass

    return RemoteReader
