"""The in-memory checkpoint tier's keeper: a per-node process that holds each local rank's
staged shard for the last few steps, so a worker that crashes (or a torchelastic restart) can
restore from host memory instead of storage (issue 30).

The keeper outlives its workers: it is its own process (own session), reached over a unix
socket. Nothing from the socket is unpickled: a request is one JSON header line, then
`nbytes` raw bytes; a shard's bytes are whatever the worker packed (`pack_state`, torch.save)
and are only read back with torch.load(weights_only=True). Every shard carries its XXH3-64
checksum: the keeper checks it on arrival and again before it answers, and the client checks
what it received, so a corrupted copy reads as "missing" and the caller falls to the next tier.

Memory is bounded twice: only the newest `keep` steps are held, and a shard that would take the
keeper past `max_bytes` is refused (the worker goes on; the durable tier still has it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

from triaxis.checkpoint import checksum

_HEADER_MAX_BYTES = 64 * 1024
_CHUNK_BYTES = 1 << 20


def pack_state(state: dict) -> bytes:
    """A rank's staged (host) state (tensors, numbers, strings, nested dicts/lists) as bytes
    for the keeper."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def unpack_state(data: bytes) -> dict:
    """The inverse of pack_state, through torch's restricted loader (no arbitrary objects).
    Shards are staged host copies, so no map_location: it cost ~30% of the load here."""
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _digest(data) -> int:
    return checksum.digest(checksum.WRITE, data)


# ---------------------------------------------------------------------------------------------
# Wire format: one JSON line, then header["nbytes"] raw bytes (0 when absent).


def _send(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    header = {**header, "nbytes": len(payload)}
    sock.sendall(json.dumps(header).encode() + b"\n")
    if payload:
        sock.sendall(payload)


def _recv_exact(rfile, n: int) -> bytes:
    # One buffer filled in place: a shard is hundreds of MB, joining chunks would copy it again.
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = rfile.readinto(view[got : got + _CHUNK_BYTES])
        if not k:
            raise ConnectionError(f"peer closed with {n - got} of {n} bytes unread")
        got += k
    return bytes(buf) if n < _CHUNK_BYTES else buf  # type: ignore[return-value]


def _recv(rfile) -> tuple[dict, bytes]:
    line = rfile.readline(_HEADER_MAX_BYTES + 1)
    if not line.endswith(b"\n"):
        raise ConnectionError("no header line (closed, or longer than 64 KiB)")
    header = json.loads(line)
    if not isinstance(header, dict) or not isinstance(header.get("nbytes", 0), int):
        raise ConnectionError("malformed header")
    return header, _recv_exact(rfile, header.get("nbytes", 0))


# ---------------------------------------------------------------------------------------------
# The keeper's store and server.


class ShardStore:
    """step -> rank -> (bytes, digest), newest `keep` steps, at most `max_bytes` in all."""

    def __init__(self, keep: int, max_bytes: int) -> None:
        if keep < 1 or max_bytes < 1:
            raise ValueError(f"keep={keep}, max_bytes={max_bytes}: both must be >= 1")
        self.keep, self.max_bytes = keep, max_bytes
        self._steps: dict[int, dict[int, tuple[bytes, int]]] = {}
        self._lock = threading.Lock()

    def held_bytes(self) -> int:
        return sum(len(b) for ranks in self._steps.values() for b, _ in ranks.values())

    def put(self, step: int, rank: int, data: bytes, digest: int) -> str | None:
        """Store a shard; the reason it was refused, or None."""
        if _digest(data) != digest:
            return f"step {step} rank {rank}: checksum mismatch on arrival"
        with self._lock:
            if self._steps and step < min(self._steps) and len(self._steps) >= self.keep:
                return f"step {step} is older than the {self.keep} steps held"
            # What would be held: this shard in, the steps beyond `keep` out. A refused shard
            # must not have evicted anything (the older copy is then the newest one held).
            after = sorted({*self._steps, step})[-self.keep :]
            held = sum(
                len(b)
                for s, ranks in self._steps.items()
                if s in after
                for r, (b, _) in ranks.items()
                if (s, r) != (step, rank)
            )
            if held + len(data) > self.max_bytes:
                return (
                    f"step {step} rank {rank}: {len(data)} more bytes exceed "
                    f"max_bytes={self.max_bytes}"
                )
            self._steps.setdefault(step, {})[rank] = (data, digest)
            for old in [s for s in self._steps if s not in after]:
                del self._steps[old]
        return None

    def get_entry(self, step: int, rank: int) -> tuple[bytes, int] | None:
        """(bytes, digest) of a held shard that still matches its digest, else None."""
        with self._lock:
            entry = self._steps.get(step, {}).get(rank)
        if entry is None or _digest(entry[0]) != entry[1]:
            return None  # a copy that rotted in memory is as good as none
        return entry

    def get(self, step: int, rank: int) -> bytes | None:
        entry = self.get_entry(step, rank)
        return None if entry is None else entry[0]

    def steps(self) -> dict[int, list[int]]:
        with self._lock:
            return {s: sorted(r) for s, r in self._steps.items()}

    def corrupt(self, step: int, rank: int) -> None:
        """Flip a byte of a held shard (tests and drills: the next-tier path)."""
        with self._lock:
            data, digest = self._steps[step][rank]
            self._steps[step][rank] = (bytes([data[0] ^ 0xFF]) + data[1:], digest)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        store: ShardStore = self.server.store  # type: ignore[attr-defined]
        try:
            while True:
                try:
                    header, payload = _recv(self.rfile)
                except (ConnectionError, ValueError):
                    return
                op = header.get("op")
                if op == "put":
                    err = store.put(
                        int(header["step"]), int(header["rank"]), payload, int(header["digest"])
                    )
                    _send(self.connection, {"ok": err is None, "error": err})
                elif op == "get":
                    entry = store.get_entry(int(header["step"]), int(header["rank"]))
                    if entry is None:
                        _send(self.connection, {"ok": False})
                    else:
                        _send(self.connection, {"ok": True, "digest": entry[1]}, entry[0])
                elif op == "steps":
                    _send(self.connection, {"ok": True, "steps": store.steps()})
                elif op == "corrupt":
                    store.corrupt(int(header["step"]), int(header["rank"]))
                    _send(self.connection, {"ok": True})
                else:
                    _send(self.connection, {"ok": False, "error": f"unknown op {op!r}"})
        except (BrokenPipeError, ConnectionResetError):
            return


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(socket_path: str, keep: int, max_bytes: int) -> None:
    """Run a keeper until killed (the launcher owns its lifetime)."""
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a previous keeper's stale socket
    server = _Server(socket_path, _Handler)
    server.store = ShardStore(keep, max_bytes)  # type: ignore[attr-defined]
    os.chmod(socket_path, 0o600)  # only this user's workers hand shards over
    server.serve_forever()


def start(socket_path: str, keep: int, max_bytes: int, wait_s: float = 60.0) -> subprocess.Popen:
    """Start a keeper in its own session (a worker's crash or process-group kill spares it) and
    wait until it answers."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "triaxis.checkpoint.keeper",
            "--socket",
            socket_path,
            "--keep",
            str(keep),
            "--max-bytes",
            str(max_bytes),
        ],
        start_new_session=True,
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keeper exited with {proc.returncode} before answering")
        if KeeperClient(socket_path).steps() is not None:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"keeper at {socket_path} did not answer within {wait_s:.0f} s")


# ---------------------------------------------------------------------------------------------
# The workers' side. Every failure to reach the keeper reads as "not in this tier".


class KeeperClient:
    def __init__(self, socket_path: str, timeout_s: float = 60.0) -> None:
        self.socket_path, self.timeout_s = socket_path, timeout_s

    def _call(self, header: dict, payload: bytes = b"") -> tuple[dict, bytes] | None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout_s)
                sock.connect(self.socket_path)
                _send(sock, header, payload)
                with sock.makefile("rb") as rfile:
                    return _recv(rfile)
        except (OSError, ConnectionError, ValueError):
            return None

    def put(self, step: int, rank: int, data: bytes) -> str | None:
        """Hand a shard over; the reason it is not held (keeper gone, refused), or None."""
        reply = self._call({"op": "put", "step": step, "rank": rank, "digest": _digest(data)}, data)
        if reply is None:
            return f"keeper at {self.socket_path} is not reachable"
        return None if reply[0].get("ok") else str(reply[0].get("error"))

    def get(self, step: int, rank: int) -> bytes | None:
        reply = self._call({"op": "get", "step": step, "rank": rank})
        if reply is None or not reply[0].get("ok"):
            return None
        header, data = reply
        return data if _digest(data) == header.get("digest") else None

    def steps(self) -> dict[int, list[int]] | None:
        """step -> ranks held; None when the keeper is not reachable."""
        reply = self._call({"op": "steps"})
        if reply is None or not reply[0].get("ok"):
            return None
        return {int(s): r for s, r in reply[0]["steps"].items()}

    def corrupt(self, step: int, rank: int) -> bool:
        reply = self._call({"op": "corrupt", "step": step, "rank": rank})
        return reply is not None and bool(reply[0].get("ok"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m triaxis.checkpoint.keeper")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--keep", type=int, required=True)
    ap.add_argument("--max-bytes", type=int, required=True)
    args = ap.parse_args(argv)
    serve(args.socket, args.keep, args.max_bytes)


if __name__ == "__main__":
    main()
