"""Recovery from a lost node, on two network-namespace hosts (root, iproute2): a ~100M-parameter
model on node0 + node1 (one rank each, dp_shard=2). node1 is killed whole (launcher, worker,
keeper) as step KILL starts; the job is relaunched at once with a fresh node1 (as an orchestrator
replacing the node would), in a new `--nnodes 2` rendezvous.

  durable  -- checkpoint.interval only: the relaunch loads the newest durable checkpoint.
  memory   -- plus the memory tier with its buddy replica, the keepers run as node daemons
              (they outlive a job's launcher): node0's rank restores from its own keeper,
              node1's from the replica node0's keeper holds.

Prints, for each: failure -> first step of the relaunched job, failure -> the failed step done
again, the steps redone. Step times from metrics.jsonl as its lines appear (bench/
memory_recovery.py's Tail). Uses the tests' namespace helpers.

    sudo python bench/memory_hosts.py              # as in bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]

from memory_recovery import Tail, prepare, shape_args  # noqa: E402

from tests.helpers import command  # noqa: E402
from tests.netns_hosts import HostNetwork, unavailable_reason  # noqa: E402
from tests.test_multinode import ENV, kill_host  # noqa: E402
from triaxis.checkpoint import keeper  # noqa: E402

TOKEN = {"TRIAXIS_BUDDY_TOKEN": "bench-token"}
_ROOTS: list[Path] = []


def daemon(host, sock: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "triaxis.checkpoint.keeper", "--socket", sock, "--keep", "2",
            "--max-bytes", str(8 << 30), "--buddy-listen", f"{host.address}:0"]  # fmt: skip
    proc = subprocess.Popen(host.prefix() + argv, env={**ENV, **TOKEN})
    while keeper.KeeperClient(sock, timeout_s=5).steps() is None:
        assert proc.poll() is None, "keeper did not start"
        time.sleep(0.1)
    return proc


def launch(host, sock: str | None, args: list, log: Path) -> subprocess.Popen:
    """`triaxis launch` inside `host`; its output goes to `log` (to see where time went)."""
    env = {**ENV, **TOKEN, **({"TRIAXIS_KEEPER_SOCKET": sock} if sock else {})}
    with open(log, "w") as out:
        return subprocess.Popen(
            host.prefix() + command("launch", *map(str, args)), env=env, stdout=out, stderr=out
        )


def scenario(a, hosts, data: Path, root: Path, memory: bool, port: int) -> tuple:
    node0, node1 = hosts
    run = root / ("memory" if memory else "durable")
    socks = [str(root / f"{run.name}-{i}.sock") for i in (0, 1)] if memory else [None, None]
    extra = [f"--checkpoint.interval={a.interval}", "--checkpoint.async_save=false"]
    if memory:
        extra += [f"--checkpoint.memory_interval={a.memory_interval}"]

    def args(attempt: int) -> list:
        return [
            "--backend", "torchrun", "--nnodes", 2, "--nproc-per-node", 1,
            "--rdzv-endpoint", f"{node0.address}:{port + attempt}", "--rdzv-timeout", 300,
            f"--data.path={data}", f"--train.run_dir={run}", "--model.preset=small",
            f"--model.dim={a.dim}", f"--model.n_layers={a.layers}", "--model.n_heads=12",
            "--model.n_kv_heads=4", f"--model.ffn_dim={a.ffn}", f"--data.seq_len={a.seq}",
            "--train.global_batch=2", "--train.micro_batch=1", f"--train.steps={a.steps}",
            "--train.val_every=0", "--metrics.log_every=1", "--metrics.progress=false",
            "--metrics.tensorboard=false", *extra,
        ]  # fmt: skip

    daemons = [daemon(h, s) for h, s in zip(hosts, socks)] if memory else []
    tail = Tail(run / "metrics.jsonl")
    first = [
        launch(h, s, args(0), root / f"{run.name}-a{i}.log")
        for i, (h, s) in enumerate(zip(hosts, socks))
    ]
    while not any(r.get("step") == a.kill - 1 for _, r in tail.seen):
        assert first[0].poll() is None, "the first job ended before the kill"
        time.sleep(0.02)
    t_fail = time.monotonic()
    kill_host(node1)
    # The orchestrator that replaces the node restarts the job at once: the survivor's launcher
    # goes too (its keeper, a node daemon, stays). Left alone, the survivor's worker may take
    # minutes to notice its peer is gone (measured: 515 s once), which is no tier's cost.
    import signal

    first[0].send_signal(signal.SIGKILL)
    for p in first:
        p.wait()
    if memory:
        daemons[1].wait()
        daemons[1] = daemon(node1, socks[1])  # the replacement node: an empty keeper
    t_relaunch = time.monotonic()
    print(
        f"{run.name}: the first job ended {t_relaunch - t_fail:.1f} s after the failure", flush=True
    )
    second = [
        launch(h, s, args(1), root / f"{run.name}-b{i}.log")
        for i, (h, s) in enumerate(zip(hosts, socks))
    ]
    for p in second:
        p.wait()
    seen = tail.stop()
    for d in daemons:
        d.kill()
    if any(p.returncode for p in second):
        sys.exit(f"the relaunched job failed ({run})")
    steps = [(t, r["step"]) for t, r in seen if "loss" in r and t > t_fail]
    first_t, first_step = steps[0]
    back = next(t for t, s in steps if s == a.kill)
    return first_t - t_fail, back - t_fail, a.kill - first_step


def main() -> None:
    ap = argparse.ArgumentParser()
    shape_args(ap, steps=20)
    ap.add_argument("--kill", type=int, default=18)
    ap.add_argument("--only", choices=["durable", "memory"], default="")
    a = ap.parse_args()
    why = unavailable_reason()
    if why:
        sys.exit(f"two namespace hosts are not available here: {why}")
    root = Path(tempfile.mkdtemp(prefix="triaxis-memhosts-"))
    _ROOTS.append(root)
    data = prepare(root)
    print(f"2 hosts x 1 rank, dim {a.dim} x {a.layers} layers; node1 killed as step {a.kill} "
          f"starts; durable every {a.interval}, memory every {a.memory_interval}; load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    rows = []
    with HostNetwork(["node0", "node1"], tag="q") as net:
        for memory, port in ((False, 29520), (True, 29530)):
            if a.only and a.only != ("memory" if memory else "durable"):
                continue
            rows.append(("memory + buddy" if memory else "durable only",
                         *scenario(a, net.hosts, data, root, memory, port)))  # fmt: skip
    print(f"{'':16} {'to first step':>14} {'back at failed step':>20} {'steps redone':>13}")
    for name, first, back, redone in rows:
        print(f"{name:16} {first:13.1f}s {back:19.1f}s {redone:13d}")
    if len(rows) == 2:
        print(f"memory/durable, back at the failed step: {rows[1][2] / rows[0][2]:.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f}; its folder {root} is removed at exit")


if __name__ == "__main__":
    import atexit
    import shutil

    # Checkpoints of a 100M model, several runs: GBs that must not outlive the bench.
    atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _ROOTS])
    main()
