"""torchrun on this node: one node standalone, or one node of a multi-node c10d rendezvous.

Multi-node, the launcher decides three things torchrun would otherwise guess from the hostname
(a guess that fails in containers, network namespaces and on multi-NIC hosts):

    is this node the rendezvous host?     it can bind the endpoint's address -> is_host
    which address do its workers publish? the source address of the route to the endpoint
                                          -> --local-addr (rank 0's becomes MASTER_ADDR)
    which interface do gloo and NCCL use? the one holding that address -> *_SOCKET_IFNAME

It also checks that the endpoint resolves and, from the other nodes, accepts a connection within
the rendezvous timeout, and it bounds the rendezvous itself by that timeout (torchrun's
join_timeout): a wrong address or a missing node fails in one line instead of hanging.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from triaxis.errors import UserError
from triaxis.launchers.netenv import (
    apply_env,
    describe_applied,
    efa_devices,
    interface_of,
    is_local_address,
    recommended_env,
    resolve,
    source_address,
)

DEFAULT_PORT = 29400


def log(msg: str) -> None:
    print(f"triaxis launch: {msg}", file=sys.stderr, flush=True)


@dataclass
class TorchrunSpec:
    nproc_per_node: int
    nnodes: int = 1
    rdzv_endpoint: str = ""
    """HOST[:PORT] of the rendezvous; empty on one node = standalone."""
    rdzv_id: str = "triaxis"
    """Names the job in the rendezvous store: every node of one job passes the same id."""
    rdzv_timeout_s: float = 600.0
    """How long nodes wait for each other (and for the endpoint to accept) before failing."""
    max_restarts: int = 0
    gpus: bool = False
    min_nnodes: int = 0
    """Elastic: the job goes on with at least this many nodes (0 = nnodes, a fixed size)."""
    last_call_s: float = 30.0
    """Elastic: once min_nnodes have joined, how long the rendezvous waits for more."""
    shutdown_timeout_s: float = 60.0
    """After SIGTERM or Ctrl-C, how long the agent waits for the workers' final checkpoint
    before it SIGKILLs them (torchrun's --shutdown-timeout; its own default is 30 s)."""

    @property
    def elastic(self) -> bool:
        return 0 < self.min_nnodes < self.nnodes


@dataclass(frozen=True)
class Rendezvous:
    address: str
    """The endpoint's IPv4 address, as every node dials it."""
    port: int
    is_host: bool | None
    """True: this node serves the store. None: loopback, let torchrun try to serve and fall
    back to a client (several launchers on one machine)."""
    local_addr: str
    ifname: str | None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep:
        return endpoint, DEFAULT_PORT
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--rdzv-endpoint={endpoint!r} is not HOST:PORT; e.g. "
            f"--rdzv-endpoint=node0:{DEFAULT_PORT}"
        )
    return host, int(port)


def discover_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    """The rank-0 host when the user gave none: MASTER_ADDR[:MASTER_PORT] (Kubernetes and most
    schedulers), else the first node of a Slurm allocation."""
    if environ.get("MASTER_ADDR"):
        return f"{environ['MASTER_ADDR']}:{environ.get('MASTER_PORT', DEFAULT_PORT)}"
    nodelist = environ.get("SLURM_JOB_NODELIST")
    if nodelist:
        from triaxis.launchers.slurm import first_node_address

        return f"{first_node_address(nodelist)}:{DEFAULT_PORT}"
    return None


def wait_reachable(address: str, port: int, timeout_s: float) -> None:
    """Block until address:port accepts a TCP connection; the host may start after us."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            socket.create_connection((address, port), timeout=max(0.1, min(5.0, remaining))).close()
            return
        except OSError as e:
            if time.monotonic() + 0.5 >= deadline:
                raise UserError(
                    f"rendezvous endpoint {address}:{port} did not accept a connection within "
                    f"{timeout_s:.0f} s ({e.strerror or e}); start `triaxis launch` on the first "
                    "node with the same --rdzv-endpoint, check the address, port and firewall, "
                    "or raise --rdzv-timeout"
                ) from None
            time.sleep(0.5)


def plan_rendezvous(endpoint: str, timeout_s: float, wait: bool = True) -> Rendezvous:
    host, port = parse_endpoint(endpoint)
    addrs = resolve(host)
    if not addrs:
        raise UserError(
            f"rendezvous host {host!r} does not resolve on this node; pass the first "
            "node's IP address or a name every node resolves (DNS, /etc/hosts)"
        )
    local = [a for a in addrs if is_local_address(a)]
    if local:
        address, src = local[0], local[0]
        is_host: bool | None = None if ipaddress.ip_address(address).is_loopback else True
    else:
        address = addrs[0]
        src = source_address(address) or ""
        if not src:
            raise UserError(
                f"no route from this node to the rendezvous host {host} "
                f"({address}); check the address and this node's network"
            )
        if wait:
            wait_reachable(address, port, timeout_s)
        is_host = False
    return Rendezvous(address, port, is_host, src, interface_of(src))


def torchrun_argv(spec: TorchrunSpec, rdzv: Rendezvous | None, entry: list[str]) -> list[str]:
    """Arguments of torch.distributed.run; `entry` follows `python -m`."""
    nnodes = f"{spec.min_nnodes}:{spec.nnodes}" if spec.elastic else str(spec.nnodes)
    argv = [
        f"--nproc-per-node={spec.nproc_per_node}",
        f"--nnodes={nnodes}",
        f"--max-restarts={spec.max_restarts}",
    ]
    if rdzv is None:
        argv.append("--standalone")
    else:
        # read_timeout: every wait of the agents in the rendezvous store (torch's default, 60 s,
        # failed elastic restarts on a loaded machine with "wait timeout after 60000ms").
        timeout_s = max(1, int(spec.rdzv_timeout_s))
        conf = f"join_timeout={timeout_s},read_timeout={timeout_s}"
        if spec.elastic:
            conf += f",last_call_timeout={spec.last_call_s:g}"
        if rdzv.is_host is not None:
            conf += f",is_host={'true' if rdzv.is_host else 'false'}"
        argv += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv.endpoint}",
            f"--rdzv-id={spec.rdzv_id}",
            f"--rdzv-conf={conf}",
            f"--local-addr={rdzv.local_addr}",
        ]
    return argv + ["-m", *entry]


def prepare(
    spec: TorchrunSpec, environ: Mapping[str, str] = os.environ, wait: bool = True
) -> Rendezvous | None:
    """Check the layout of nodes, find the rendezvous (on the other nodes: `wait` until it
    accepts), set the network environment (logged)."""
    if spec.nproc_per_node < 1 or spec.nnodes < 1:
        raise UserError(
            f"--nproc-per-node={spec.nproc_per_node} and --nnodes={spec.nnodes} must be positive"
        )
    endpoint = spec.rdzv_endpoint
    if spec.nnodes > 1 and not endpoint:
        endpoint = discover_endpoint(environ) or ""
        if not endpoint:
            raise UserError(
                f"--nnodes={spec.nnodes} needs --rdzv-endpoint HOST:PORT, the "
                "address of the first node, reachable from every node"
            )
        log(f"rendezvous endpoint {endpoint} (discovered)")
    rdzv = plan_rendezvous(endpoint, spec.rdzv_timeout_s, wait) if endpoint else None
    if rdzv is not None and spec.nnodes > 1 and rdzv.is_host is None:
        log(f"loopback rendezvous {rdzv.endpoint}: every node must be this machine")
    efa = efa_devices()
    ifname = rdzv.ifname if rdzv is not None and spec.nnodes > 1 else None
    applied, kept = apply_env(recommended_env(bool(efa), spec.gpus, ifname))
    if efa:
        log(f"{len(efa)} EFA device(s) ({', '.join(efa)})")
    if applied or kept:
        log(f"network environment: {describe_applied(applied, kept)}")
    return rdzv


def run_torchrun(argv: list[str], spec: TorchrunSpec, rdzv: Rendezvous | None) -> int:
    """Run torch.distributed.run in this process; failures become exit codes or UserErrors."""
    import signal

    from torch.distributed import DistStoreError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun_run

    def on_ctrl_c(signum, frame) -> None:
        # The first Ctrl-C as torch elastic's own handler would: the agent passes SIGINT to the
        # workers (they save, then exit) and waits for them. The second exits now; the
        # workers' parent-death signal ends them. (torch's handler would start a second wait.)
        if interrupted:
            log("interrupted again: stopping the workers without a checkpoint")
            os._exit(128 + signal.SIGINT)
        interrupted.append(signum)
        log(
            "interrupted: the workers save a checkpoint after the current step (Ctrl-C "
            "again to stop them without one)"
        )
        raise SignalException(f"Process {os.getpid()} got signal: SIGINT", sigval=signal.SIGINT)

    interrupted: list[int] = []
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        args = parse_args(argv)
        args.shutdown_timeout = int(spec.shutdown_timeout_s)
        if old_handler is not None:  # SIGINT is ours (above): torch's would wait a second time
            args.signals_to_handle = "SIGTERM,SIGHUP,SIGQUIT"
        # run(), not main(): main's @record only adds a "no error file for the parent" line.
        torchrun_run(args)
    except ChildFailedError as e:
        return report_failures(e.failures)
    except SignalException as e:
        # Preemption, scancel, a requeue, Ctrl-C: the agent has passed the signal on to the
        # workers, which write a final checkpoint. The usual exit status of a signal.
        log(f"stopped by signal {int(e.sigval)}; the next launch resumes from the last checkpoint")
        return 128 + int(e.sigval)
    except RendezvousTimeoutError:
        raise UserError(
            f"the rendezvous at {_where(rdzv)} did not form within "
            f"{spec.rdzv_timeout_s:.0f} s: {_expected(spec)} expected, this one joined and "
            "not enough others did; start `triaxis launch` with the same --rdzv-endpoint, "
            "--rdzv-id and --nnodes on every node, check that they reach the endpoint "
            "(network, firewall), or raise --rdzv-timeout"
        ) from None
    except DistStoreError as e:
        # A wait in the rendezvous store ran out (the other agents did not write their part).
        raise UserError(
            f"the nodes stopped waiting for each other in the rendezvous store at "
            f"{_where(rdzv)} after {spec.rdzv_timeout_s:.0f} s ({_first_line(e)}): "
            f"{_expected(spec)} expected; check that every node still runs `triaxis launch` "
            "with the same --rdzv-endpoint, --rdzv-id and --nnodes and reaches the endpoint "
            "(network, firewall), or raise --rdzv-timeout on a loaded machine"
        ) from None
    except RendezvousError as e:
        raise UserError(
            f"rendezvous failed: {e}; check --rdzv-endpoint and that every node reaches it"
        ) from None
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    return 0


def _where(rdzv: Rendezvous | None) -> str:
    return rdzv.endpoint if rdzv else "this node (standalone)"


def _expected(spec: TorchrunSpec) -> str:
    nodes = f"{spec.min_nnodes} to {spec.nnodes}" if spec.elastic else str(spec.nnodes)
    return f"{nodes} node(s) of {spec.nproc_per_node} process(es) each"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def first_failure(failures: dict) -> tuple[int, object]:
    """The rank whose failure came first. Workers write a precise time into their error file
    (train/distributed.py); a worker killed by a signal writes none and is taken as the cause
    (an OOM kill breaks its peers' collectives, whose errors come later) - except SIGTERM,
    the signal the agent itself sends to close the group once it has seen a failure: a rank
    it caught before that rank could exit is a bystander, listed after every error file."""

    def key(item):
        rank, f = item
        info = _triaxis_info(f)
        if info is None and f.exitcode < 0:
            return (0 if -f.exitcode != 15 else 2, 0.0, rank)  # 15: SIGTERM
        return (1, info["time"] if info else float(f.timestamp), rank)

    return min(failures.items(), key=key)


def _triaxis_info(failure) -> dict | None:
    data = failure.error_file_data
    return data.get("triaxis") if isinstance(data, dict) else None


def report_failures(failures: dict) -> int:
    """Print the first failing rank's cause (its traceback too, for a bug) and return the exit
    status; a user error (exit 2) becomes this launcher's own one-line error."""
    import signal as signal_module

    rank, failure = first_failure(failures)
    info = _triaxis_info(failure)
    # Peers that failed with the same line (a refusal every rank met) add nothing.
    others = sorted(
        r
        for r in failures
        if r != rank
        and not (info and (_triaxis_info(failures[r]) or {}).get("line") == info["line"])
    )
    if others:
        log(
            f"rank(s) {others} stopped after rank {rank} (exit codes "
            f"{[failures[r].exitcode for r in others]})"
        )
    if info is None:
        if failure.exitcode < 0:
            name = signal_module.Signals(-failure.exitcode).name
            line = f"killed by {name}" + (
                " (out of memory? see `dmesg`)" if name == "SIGKILL" else ""
            )
            code = 128 - failure.exitcode
        else:
            line, code = f"exited with status {failure.exitcode}", failure.exitcode
        log(f"rank {rank} failed: {line}")
        return code
    if info.get("traceback"):
        print(info["traceback"].rstrip(), file=sys.stderr, flush=True)
    if info.get("exit_code") == UserError.exit_code:
        raise UserError(f"rank {rank}: {info['line']}")
    if info.get("kind") == "hang":  # the line names the stuck rank(s), not the reporter
        log(f"stopped by the watchdog: {info['line']}")
    else:
        log(f"rank {rank} failed: {info['line']}")
    return int(info.get("exit_code") or 1)


def launch_module(spec: TorchrunSpec, entry: list[str], dry_run: bool = False) -> int:
    """Start `python -m ENTRY` on spec.nproc_per_node processes of this node."""
    rdzv = prepare(spec, wait=not dry_run)
    argv = torchrun_argv(spec, rdzv, entry)
    world = spec.nproc_per_node * spec.nnodes
    log(
        f"{world} processes ({spec.nnodes} node(s) x {spec.nproc_per_node}, "
        f"{'nccl' if spec.gpus else 'gloo'}): torchrun {' '.join(argv)}"
    )
    if spec.elastic:
        log(
            f"elastic: {spec.min_nnodes} to {spec.nnodes} nodes; when a node is lost the "
            f"others restart (up to --max-restarts={spec.max_restarts} times) on the nodes "
            "left and resume from the last checkpoint"
        )
    if dry_run:
        # torchrun reads PET_<OPTION> variables: the launcher's grace period for final saves.
        print(
            f"PET_SHUTDOWN_TIMEOUT={int(spec.shutdown_timeout_s)} "
            + subprocess.list2cmdline([sys.executable, "-m", "torch.distributed.run", *argv])
        )
        return 0
    # The workers ask the kernel to kill them when this process dies (a parent-death signal;
    # train/distributed.py): the agent runs here, in this process's main thread.
    previous = os.environ.get("TRIAXIS_LAUNCHER_PID")
    os.environ["TRIAXIS_LAUNCHER_PID"] = str(os.getpid())
    try:
        return run_torchrun(argv, spec, rdzv)
    finally:  # called in-process (tests, embedding): later children are not our workers
        if previous is None:
            os.environ.pop("TRIAXIS_LAUNCHER_PID", None)
        else:
            os.environ["TRIAXIS_LAUNCHER_PID"] = previous
