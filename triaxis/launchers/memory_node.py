"""The launcher's part of the memory tier (issue 30): one keeper per node, started before the
workers and stopped after them, so it outlives a worker's crash and torchelastic's restarts of
the workers; its socket reaches them in TRIAXIS_KEEPER_SOCKET.

A keeper the node already runs (TRIAXIS_KEEPER_SOCKET set and answering) is used as is: it
also outlives the launcher, so a relaunched job restores from it.

The keeper's shards are files beside its socket, on a tmpfs (/dev/shm, or TRIAXIS_KEEPER_DIR):
host memory. Its size is checked before anything starts: the node's state times
(memory_keep + 1) must fit in half the node's memory and in the tmpfs's free space (a
container's /dev/shm is 64 MB unless started with --shm-size).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass

from triaxis.errors import UserError

DIR_ENV = "TRIAXIS_KEEPER_DIR"
_GIB = 1 << 30


def keeper_dir() -> str:
    """Where keepers put their sockets and shards: TRIAXIS_KEEPER_DIR, else /dev/shm (memory),
    else the temporary folder."""
    chosen = os.environ.get(DIR_ENV, "")
    if chosen:
        return chosen
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def state_bytes_per_rank(model_args, dims) -> int:
    """Bytes of one rank's shard: its parameters and AdamW state (no gradients)."""
    from triaxis.plan.memory import predict_state_bytes_per_rank

    got = predict_state_bytes_per_rank(
        model_args, dims.dp_shard * dims.cp, dims.dp_replicate, dims.tp, dims.pp
    )
    return got["params"] + got["optim"]


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def buddy_on(cfg, nnodes: int) -> bool:
    """Whether the nodes replicate their memory copies (checkpoint.memory_buddy)."""
    mode = cfg.checkpoint.memory_buddy
    if mode == "on" and nnodes < 2:
        raise UserError(
            f"checkpoint.memory_buddy='on' with --nnodes={nnodes}: a buddy replica lives on "
            "another node; use 2 or more nodes, or set checkpoint.memory_buddy=auto (off on "
            "one node)"
        )
    return bool(cfg.checkpoint.memory_interval) and (mode == "on" or mode == "auto" and nnodes > 1)


def check_node(
    cfg, model_args, dims, local_ranks: int, directory: str | None = None, buddy: bool = False
) -> int:
    """Raise UserError when this node cannot hold the memory tier (with `buddy`: also its
    predecessor's replicas); returns the keeper's byte bound for each of the two."""
    from triaxis.checkpoint.memory_tier import check_fits, footprint_bytes

    keep, per_rank = cfg.checkpoint.memory_keep, state_bytes_per_rank(model_args, dims)
    copies = 2 if buddy else 1
    host = host_memory_bytes()
    check_fits(per_rank * copies, local_ranks, keep, host)
    directory = directory or keeper_dir()
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize // copies
    need = footprint_bytes(per_rank, local_ranks, keep)
    if need > 0.9 * free:
        raise UserError(
            f"checkpoint.memory_interval={cfg.checkpoint.memory_interval}: the memory tier needs "
            f"{need / _GIB:.2f} GiB on this node, but {directory} has {free / _GIB:.2f} GiB free; "
            f"give the container a larger /dev/shm (docker run --shm-size={int(need / _GIB) + 1}g)"
            f", point {DIR_ENV} at a larger tmpfs, or lower checkpoint.memory_keep"
        )
    # The bound leaves room for what the estimate does not count (buffers, RNG, small tensors).
    return int(min(0.5 * host / copies, 0.9 * free, max(2 * need, need + (64 << 20))))


def node_address(rdzv_endpoint: str) -> str:
    """This node's address on the network that reaches the rendezvous (its route there)."""
    import socket

    from triaxis.launchers.torchrun import parse_endpoint

    host, port = parse_endpoint(rdzv_endpoint)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


@dataclass(frozen=True)
class NodeTier:
    max_bytes: int
    """The keeper's bound (and its replica store's)."""
    buddy_listen: str = ""
    """HOST:PORT of this node's buddy server ("" = no buddy replica)."""
    token: str = ""
    """The job's buddy token."""


def node_tier(
    cfg, model_args, dims, nproc: int, nnodes: int, rdzv_endpoint: str, rdzv_id: str
) -> NodeTier | None:
    """This node's memory tier, checked (one-line errors), or None when it is off."""
    if not cfg.checkpoint.memory_interval:
        buddy_on(cfg, nnodes)  # still refuses memory_buddy=on on one node
        return None
    buddy = buddy_on(cfg, nnodes)
    max_bytes = check_node(cfg, model_args, dims, nproc, buddy=buddy)
    if not buddy:
        return NodeTier(max_bytes)
    from triaxis.checkpoint.buddy import job_token
    from triaxis.launchers.torchrun import discover_endpoint

    endpoint = rdzv_endpoint or discover_endpoint() or ""
    host = node_address(endpoint) if endpoint else "127.0.0.1"
    token = job_token(rdzv_id or "triaxis", endpoint, cfg.train.run_dir)
    return NodeTier(max_bytes, f"{host}:{cfg.checkpoint.memory_buddy_port}", token)


@contextlib.contextmanager
def node_keeper(cfg, tier: NodeTier):
    """Run this node's keeper while the block runs (the workers): its socket in the
    environment the workers inherit (and with a buddy replica, the job's token)."""
    from triaxis.checkpoint import keeper
    from triaxis.checkpoint.memory_save import SOCKET_ENV

    given = os.environ.get(SOCKET_ENV, "")
    if given and keeper.KeeperClient(given, timeout_s=10).steps() is not None:
        # A keeper the node already runs (a node daemon, a Slurm prolog): it outlives this
        # launcher too, so even a relaunched job restores from it. Not ours to stop.
        yield given
        return
    # One keeper per launcher: a relaunched node (a new launcher) starts with an empty one.
    path = os.path.join(keeper_dir(), f"triaxis-keeper-{os.getuid()}-{os.getpid()}.sock")
    if tier.buddy_listen:
        from triaxis.checkpoint.buddy import TOKEN_ENV

        os.environ.setdefault(TOKEN_ENV, tier.token)
    proc = keeper.start(
        path, cfg.checkpoint.memory_keep, tier.max_bytes, parent_pid=os.getpid(),
        buddy_listen=tier.buddy_listen,
    )  # fmt: skip
    from triaxis.launchers.torchrun import log

    log(
        f"memory tier: this node's keeper at {path} (up to {tier.max_bytes >> 20} MiB)"
        + (f", buddy replicas on {tier.buddy_listen}" if tier.buddy_listen else "")
    )
    previous = os.environ.get(SOCKET_ENV)
    os.environ[SOCKET_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = previous
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001  (it is killed below either way)
            proc.kill()
        shutil.rmtree(keeper.shard_dir(path), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
