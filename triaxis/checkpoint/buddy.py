"""The memory tier's buddy replica (issue 30): every node's keeper also pushes each shard it
adopts to the next node's keeper (a ring over the nodes: node i -> node (i + 1) mod N), over TCP.
When a node is lost with its keeper (a replaced host), its ranks restore from the replica its
successor holds; losing two adjacent nodes loses both copies (the durable tier remains).

Runs inside the keeper process (triaxis.checkpoint.keeper.serve, `--buddy-listen`):
- `BuddyServer` listens on the node's address and holds the predecessor's replicas in a
  ShardStore of its own (same `keep` and byte bound as the node's own shards).
- `Replicator` pushes each adopted shard in a background thread: training never waits for the
  network; a push that fails is logged and superseded by the next step's.

The wire format is the keeper's (one JSON header line, raw bytes, XXH3-64 checksums checked on
arrival; nothing is ever unpickled from the network). Every request carries the job's token
(TRIAXIS_BUDDY_TOKEN, the same on every node; `triaxis launch` derives one per job when it is
unset), compared in constant time: a process that lacks it can neither push nor read replicas.
Like the rendezvous and NCCL's own sockets, the port belongs on the cluster's private network.

Workers use `replica_steps` and `fetch` (below) when they restore.
"""

from __future__ import annotations

import hmac
import os
import socket
import socketserver
import sys
import threading
import time

from triaxis.checkpoint import keeper

TOKEN_ENV = "TRIAXIS_BUDDY_TOKEN"
"""The job's token, the same on every node."""
CONNECT_TIMEOUT_S = 5.0
"""A buddy that does not accept within this is taken as gone (its node was lost)."""
DATA_TIMEOUT_S = 600.0
"""Generous: a shard of GBs crosses a loaded network."""


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _call(addr: str, header: dict, payload=b"") -> tuple[dict, bytes] | None:
    """One request to a buddy server; None when it cannot be reached or answers badly."""
    try:
        with socket.create_connection(parse_addr(addr), timeout=CONNECT_TIMEOUT_S) as sock:
            sock.settimeout(DATA_TIMEOUT_S)
            keeper._send(sock, header, payload)
            with sock.makefile("rb") as rfile:
                return keeper._recv(rfile)
    except (OSError, ConnectionError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The workers' side


def replica_steps(addr: str, token: str, rank: int) -> list[int]:
    """Steps the buddy at `addr` holds a replica of `rank`'s shard for ([] when unreachable)."""
    reply = _call(addr, {"op": "replica_steps", "token": token})
    if reply is None or not reply[0].get("ok"):
        return []
    return sorted(int(s) for s, ranks in reply[0]["steps"].items() if rank in ranks)


def fetch(addr: str, token: str, step: int, rank: int):
    """The replica's bytes if the buddy holds it and they match its checksum, else None."""
    reply = _call(addr, {"op": "replica_get", "token": token, "step": step, "rank": rank})
    if reply is None or not reply[0].get("ok"):
        return None
    header, data = reply
    return data if keeper._digest(data) == header.get("digest") else None


# ---------------------------------------------------------------------------------------------
# The keeper's side


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server = self.server
        try:
            header, payload = keeper._recv(self.rfile)
        except (ConnectionError, ValueError, OSError):
            return
        token = str(header.get("token", ""))
        if not hmac.compare_digest(token.encode(), server.token.encode()):  # type: ignore[attr-defined]
            keeper._send(self.connection, {"ok": False, "error": "wrong token"})
            return
        store: keeper.ShardStore = server.store  # type: ignore[attr-defined]
        op, step, rank = header.get("op"), int(header.get("step", -1)), int(header.get("rank", -1))
        reply, data = {"ok": True}, b""
        if op == "replica_put":
            err = store.put(step, rank, payload, int(header["digest"]))
            reply = {"ok": err is None, "error": err}
        elif op == "replica_steps":
            reply["steps"] = store.steps()
        elif op == "replica_get":
            found, got = store.locate(step, rank), store.get(step, rank)
            if found is None or got is None:
                reply = {"ok": False}
            else:
                reply, data = {"ok": True, "digest": found[1]}, got
        else:
            reply = {"ok": False, "error": f"unknown op {op!r}"}
        try:
            keeper._send(self.connection, reply, data)
        except OSError:
            pass


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class BuddyServer:
    """Holds the predecessor node's replicas; serves them to its ranks after a replacement."""

    def __init__(self, listen: str, token: str, directory: str, keep: int, max_bytes: int):
        self.store = keeper.ShardStore(directory, keep, max_bytes)
        host, port = parse_addr(listen)
        self.server = _TCPServer((host, port), _Handler)
        self.server.store, self.server.token = self.store, token  # type: ignore[attr-defined]
        self.address = f"{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Replicator:
    """Pushes this node's adopted shards to the successor's buddy server, newest first, in the
    background; only the newest shard of each rank waits (an older one is superseded)."""

    def __init__(self, token: str):
        self.token, self.peer = token, ""
        self._pending: dict[int, tuple[int, str, int]] = {}  # rank -> (step, path, digest)
        self._cv = threading.Condition()
        self.pushed: list[tuple[int, int]] = []
        self.failures = 0
        threading.Thread(target=self._run, daemon=True).start()

    def set_peer(self, addr: str) -> None:
        with self._cv:
            self.peer = addr
            self._cv.notify()

    def offer(self, step: int, rank: int, path: str, digest: int) -> None:
        with self._cv:
            self._pending[rank] = (step, path, digest)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self.peer and self._pending):
                    self._cv.wait()
                rank, (step, path, digest) = self._pending.popitem()
                peer = self.peer
            if not self._push(peer, step, rank, path, digest):
                with self._cv:  # try again with the next offer (or this one, if none newer)
                    self._pending.setdefault(rank, (step, path, digest))
                time.sleep(1.0)

    def _push(self, peer: str, step: int, rank: int, path: str, digest: int) -> bool:
        try:
            data = keeper._map(path)
        except OSError:
            return True  # evicted before it could go: a newer step supersedes it
        header = {"op": "replica_put", "token": self.token, "step": step, "rank": rank}
        reply = _call(peer, {**header, "digest": digest}, data)
        if reply is not None and reply[0].get("ok"):
            if self.failures:  # say once that a failing streak ended
                print(f"[triaxis keeper] buddy replicas reach {peer} again", file=sys.stderr)
            self.pushed.append((step, rank))
            self.failures = 0
            return True
        self.failures += 1
        if self.failures == 1:  # once per streak: a dead buddy is retried every second
            why = "unreachable" if reply is None else reply[0].get("error")
            print(
                f"[triaxis keeper] buddy replica of step {step} rank {rank} to {peer} failed "
                f"({why}); retrying with each new step",
                file=sys.stderr,
                flush=True,
            )
        return False


def job_token(*parts: str) -> str:
    """TRIAXIS_BUDDY_TOKEN, else one derived from what every node of the job shares."""
    import hashlib

    given = os.environ.get(TOKEN_ENV, "")
    return given or hashlib.sha256("\0".join(parts).encode()).hexdigest()
