"""The in-memory checkpoint tier's keeper: a per-node process that holds each local rank's
staged shard for the last few steps, so a worker that crashes (or a torchelastic restart) can
restore from host memory instead of storage (issue 30).

The keeper outlives its workers: it is its own process (own session), reached over a unix
socket that carries only JSON lines (and, for a peer that cannot share files, raw shard bytes).
Shards live as files in the keeper's directory, which the launcher puts on a tmpfs (/dev/shm):
host memory that survives the worker's death without a copy through a socket. A worker writes its
shard straight into a file there (`put_state`: the raw format of triaxis.checkpoint.rawstate,
one copy from the staged tensors), and the keeper adopts it; a restore maps the file and the
tensors view it, so the only copy is into the live model. Nothing is unpickled.

Every shard carries its XXH3-64 checksum: the keeper checks it on adoption, and the client checks
what it maps, so a corrupted copy reads as "missing" and the caller falls to the next tier.

Memory is bounded twice: only the newest `keep` steps are held, and a shard that would take the
keeper past `max_bytes` is refused (the worker goes on; the durable tier still has it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

from triaxis.checkpoint import checksum, rawstate
from triaxis.checkpoint.shard_store import ShardStore, _digest, _map, _unlink  # noqa: F401

_HEADER_MAX_BYTES = 64 * 1024
_CHUNK_BYTES = 1 << 20


def pack_state(state: dict) -> bytearray:
    """A rank's staged (host) state (tensors, numbers, strings, nested dicts/lists) as bytes
    for the keeper (triaxis.checkpoint.rawstate)."""
    return rawstate.pack_state(state)


def unpack_state(data) -> dict:
    """The inverse of pack_state; the tensors view `data` (no copy, nothing unpickled)."""
    return rawstate.unpack_state(data)


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
# The keeper's server (its store: triaxis.checkpoint.shard_store).


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        store: ShardStore = self.server.store  # type: ignore[attr-defined]
        try:
            while True:
                try:
                    header, payload = _recv(self.rfile)
                except (ConnectionError, ValueError):
                    return
                self._answer(store, header, payload)
        except (BrokenPipeError, ConnectionResetError):
            return

    def _answer(self, store: ShardStore, header: dict, payload: bytes) -> None:
        op, reply, data = header.get("op"), {"ok": True}, b""
        step, rank = int(header.get("step", -1)), int(header.get("rank", -1))
        if op in ("put", "adopt"):
            digest = int(header["digest"])
            if op == "put":
                err = store.put(step, rank, payload, digest)
            else:
                err = store.adopt(step, rank, str(header["path"]), digest)
            reply = {"ok": err is None, "error": err}
        elif op == "locate":
            found = store.locate(step, rank)
            reply = (
                {"ok": False}
                if found is None
                else {"ok": True, "path": found[0], "digest": found[1]}
            )
        elif op == "get":  # the bytes themselves: for a peer on another host
            found, got = store.locate(step, rank), store.get(step, rank)
            if found is None or got is None:
                reply = {"ok": False}
            else:
                reply, data = {"ok": True, "digest": found[1]}, got
        elif op == "info":
            reply["incoming"] = store.incoming
        elif op == "steps":
            reply["steps"] = store.steps()
        elif op == "corrupt":
            store.corrupt(step, rank)
        elif op == "buddy":  # this node's buddy server, for the other nodes' ranks
            address = getattr(self.server, "buddy_address", "")
            reply = {"ok": bool(address), "address": address}
        elif op == "set_peer":  # the successor node's buddy server: where replicas go
            replicator = getattr(self.server, "replicator", None)
            if replicator is None:
                reply = {"ok": False, "error": "this keeper runs without a buddy replica"}
            else:
                replicator.set_peer(str(header["address"]))
        else:
            reply = {"ok": False, "error": f"unknown op {op!r}"}
        _send(self.connection, reply, data)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def shard_dir(socket_path: str) -> str:
    """Where the keeper at socket_path keeps its shards (beside the socket: put the socket on
    a tmpfs, /dev/shm, to hold them in memory)."""
    return socket_path + ".d"


def _watch_parent(parent_pid: int, socket_path: str) -> None:
    """End with the launcher that started this keeper, even if it was SIGKILLed: its shards
    are host memory no one else would free."""
    import shutil

    while os.getppid() == parent_pid:
        time.sleep(1.0)
    shutil.rmtree(shard_dir(socket_path), ignore_errors=True)
    _unlink(socket_path)
    os._exit(0)


def serve(
    socket_path: str,
    keep: int,
    max_bytes: int,
    parent_pid: int = 0,
    buddy_listen: str = "",
    token: str = "",
) -> None:
    """Run a keeper until killed (the launcher owns its lifetime; with `parent_pid`, also
    until that process is gone). With `buddy_listen` (HOST:PORT) it also replicates its shards
    to the next node's keeper and holds the previous node's (triaxis.checkpoint.buddy)."""
    import shutil

    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a previous keeper's stale socket
    shutil.rmtree(shard_dir(socket_path), ignore_errors=True)  # and its shards: not ours
    os.makedirs(shard_dir(socket_path), mode=0o700)
    server = _Server(socket_path, _Handler)
    store = ShardStore(shard_dir(socket_path), keep, max_bytes, recycle=True)
    server.store = store  # type: ignore[attr-defined]
    if buddy_listen:
        from triaxis.checkpoint.buddy import BuddyServer, Replicator

        replicas = os.path.join(shard_dir(socket_path), "replicas")
        buddy = BuddyServer(buddy_listen, token, replicas, keep, max_bytes)
        server.buddy_address = buddy.address  # type: ignore[attr-defined]
        server.replicator = Replicator(token)  # type: ignore[attr-defined]
        store.on_adopt = lambda step, rank, path, digest: server.replicator.offer(  # type: ignore[attr-defined]
            step, rank, path, digest
        )
    os.chmod(socket_path, 0o600)  # only this user's workers hand shards over
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid, socket_path), daemon=True).start()
    server.serve_forever()


def start(
    socket_path: str,
    keep: int,
    max_bytes: int,
    wait_s: float = 60.0,
    parent_pid: int = 0,
    buddy_listen: str = "",
) -> subprocess.Popen:
    """Start a keeper in its own session (a worker's crash or process-group kill spares it) and
    wait until it answers. With `parent_pid` (the caller's pid) it ends when that process does."""
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
            "--parent-pid",
            str(parent_pid),
            *(["--buddy-listen", buddy_listen] if buddy_listen else []),
        ],
        start_new_session=True,
        # The token travels in the environment (TRIAXIS_BUDDY_TOKEN), not on a command line
        # every user of the node can read.
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

    def _call(self, header: dict, payload=b"") -> tuple[dict, bytes] | None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout_s)
                sock.connect(self.socket_path)
                _send(sock, header, payload)
                with sock.makefile("rb") as rfile:
                    return _recv(rfile)
        except (OSError, ConnectionError, ValueError):
            return None

    def _reply(self, header: dict, payload=b"") -> str | None:
        reply = self._call(header, payload)
        if reply is None:
            return f"keeper at {self.socket_path} is not reachable"
        return None if reply[0].get("ok") else str(reply[0].get("error"))

    def put(self, step: int, rank: int, data) -> str | None:
        """Hand a packed shard over as bytes; the reason it is not held (keeper gone, refused),
        or None. put_state writes it in place instead (no copy through the socket)."""
        header = {"op": "put", "step": step, "rank": rank, "digest": _digest(data)}
        return self._reply(header, data)

    def put_state(self, step: int, rank: int, state: dict) -> str | None:
        """Pack `state` straight into a file in the keeper's directory (one copy of the staged
        tensors) and have the keeper adopt it; the reason it is not held, or None."""
        info = self._call({"op": "info"})
        if info is None or not info[0].get("ok"):
            return f"keeper at {self.socket_path} is not reachable"
        path = os.path.join(info[0]["incoming"], f"{step}-{rank}-{os.getpid()}")
        try:  # claim this rank's evicted shard file: its memory is allocated already
            os.replace(os.path.join(info[0]["incoming"], f"spare-{rank}"), path)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            hasher = checksum.new(checksum.WRITE)
            try:
                rawstate.write_to_file(state, fd, hasher)
            finally:
                os.close(fd)
            digest = hasher.intdigest()
        except OSError as e:  # a full tmpfs: not held, the durable tier still has it
            try:
                os.unlink(path)
            except OSError:
                pass
            return f"step {step} rank {rank}: cannot write {path}: {e.strerror or e}"
        return self._reply(
            {"op": "adopt", "step": step, "rank": rank, "digest": digest, "path": path}
        )

    def get(self, step: int, rank: int):
        """The shard's bytes (a private map of the keeper's file: no copy) if held and intact,
        else None."""
        reply = self._call({"op": "locate", "step": step, "rank": rank})
        if reply is None or not reply[0].get("ok"):
            return None
        try:
            data = _map(reply[0]["path"])
        except OSError:
            return None  # evicted between the answer and the map
        return data if _digest(data) == reply[0].get("digest") else None

    def get_state(self, step: int, rank: int) -> dict | None:
        """The shard unpacked (tensors view the map), or None."""
        data = self.get(step, rank)
        return None if data is None else unpack_state(data)

    def steps(self) -> dict[int, list[int]] | None:
        """step -> ranks held; None when the keeper is not reachable."""
        reply = self._call({"op": "steps"})
        if reply is None or not reply[0].get("ok"):
            return None
        return {int(s): r for s, r in reply[0]["steps"].items()}

    def corrupt(self, step: int, rank: int) -> bool:
        reply = self._call({"op": "corrupt", "step": step, "rank": rank})
        return reply is not None and bool(reply[0].get("ok"))

    def buddy_address(self) -> str:
        """HOST:PORT of this node's buddy server ("" without one, or no keeper)."""
        reply = self._call({"op": "buddy"})
        return str(reply[0].get("address", "")) if reply is not None else ""

    def set_peer(self, address: str) -> str | None:
        """Send this node's replicas to the buddy server at `address`; the reason not, or None."""
        return self._reply({"op": "set_peer", "address": address})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m triaxis.checkpoint.keeper")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--keep", type=int, required=True)
    ap.add_argument("--max-bytes", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--buddy-listen", default="")
    args = ap.parse_args(argv)
    from triaxis.checkpoint.buddy import TOKEN_ENV

    token = os.environ.get(TOKEN_ENV, "")
    if args.buddy_listen and not token:
        ap.error(f"--buddy-listen needs {TOKEN_ENV} in the environment")
    serve(args.socket, args.keep, args.max_bytes, args.parent_pid, args.buddy_listen, token)


if __name__ == "__main__":
    main()
