"""MiCS hierarchical all-gather against torch's flat one, across two hosts with a slow NIC each.

Two network-namespace hosts (tests/netns_hosts.py), each NIC (its veth `eth0`) shaped to
--rate by `tc tbf`; torchrun 2 nodes x 2 processes; one dp_shard group of 4 ranks. In the same
run, alternating, on the same buffers: torch's flat all-gather over the group (what FSDP2
does) and triaxis's `HierarchicalAllGather` (across hosts among same-local ranks, then within the
host over loopback). Prints seconds per gather and the ratio. Needs root, `ip`, `tc`, `nsenter`.

    python bench/hierarchical_gather.py [--rate 200mbit] [--mib 8] [--iters 5]

gloo's all-gather is a ring (0 -> 1 -> 2 -> 3 -> 0): it crosses each host boundary once and
sends 3/4 of the gathered bytes out of each host; the two-phase gather sends 2 x 1/4 (each rank
one chunk to its peer). One NIC per host here, so the figure shows the volume cut (3/4 -> 1/2),
not the parallel NICs of a GPU node.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(mib: float, iters: int) -> None:
    import torch
    import torch.distributed as dist

    from triaxis.parallel.compat import all_gather_single
    from triaxis.parallel.dims import ParallelDims
    from triaxis.parallel.hierarchical import HierarchicalAllGather, build_groups, node_split

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(1, world, 1, 1, world)
    split = node_split(dims, int(os.environ["LOCAL_WORLD_SIZE"]))
    two_phase = HierarchicalAllGather(*build_groups(dims, split, rank), split)
    chunk = int(mib * 2**20 / 4 / world)
    out = torch.empty(world * chunk)
    mine = out[rank * chunk : (rank + 1) * chunk]
    mine.fill_(rank)
    times: dict[str, list[float]] = {"flat": [], "hierarchical": []}

    def flat(o, i, g):
        all_gather_single(o, i.clone(), group=g)

    across = two_phase.across

    def phase1(o, i, g):
        all_gather_single(o[: split.nodes * chunk], i.clone(), group=across)

    times["across only"] = []
    for it in range(iters + 1):  # the first round warms up the connections
        for name, fn in (("flat", flat), ("hierarchical", two_phase), ("across only", phase1)):
            dist.barrier()
            start = time.perf_counter()
            fn(out, mine, dist.group.WORLD)
            dist.barrier()
            if it:
                times[name].append(time.perf_counter() - start)
            expected = torch.arange(world).repeat_interleave(chunk).float()
            assert name == "across only" or torch.equal(out, expected), name
            mine.fill_(rank)
    if rank == 0:
        best = {k: min(v) for k, v in times.items()}
        print("RESULT " + json.dumps({"mib": mib, **best}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="200mbit", help="tc rate of each host's NIC")
    ap.add_argument("--mib", type=float, default=8.0, help="gathered size (fp32 MiB)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.mib, a.iters)
        return
    sys.path.insert(0, str(ROOT))
    from tests.netns_hosts import HostNetwork, unavailable_reason

    if reason := unavailable_reason():
        sys.exit(f"cannot run: {reason}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env["GLOO_SOCKET_IFNAME"] = "eth0"
    with HostNetwork(["node0", "node1"], tag="b") as net:
        node0 = net.hosts[0]
        for h in net.hosts:
            subprocess.run(
                ["nsenter", f"--net=/run/netns/{h.netns}", "tc", "qdisc", "add", "dev", "eth0"]
                + ["root", "tbf", "rate", a.rate, "burst", "64kb", "latency", "500ms"],
                check=True,
            )
        procs = []
        for h in reversed(net.hosts):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=2",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={node0.address}:29420",
                f"--rdzv-conf=join_timeout=120,is_host={'true' if h is node0 else 'false'}",
                f"--local-addr={h.address}",
                __file__,
                "--worker",
                f"--mib={a.mib}",
                f"--iters={a.iters}",
            ]
            procs.append(
                subprocess.Popen(
                    h.prefix() + cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
            )
        outs = [p.communicate(timeout=900)[0].decode() for p in procs]
    lines = [x for o in outs for x in o.splitlines() if x.startswith("RESULT ")]
    if not lines or any(p.returncode for p in procs):
        sys.exit("run failed:\n" + "\n".join(o[-3000:] for o in outs))
    r = json.loads(lines[0][len("RESULT ") :])
    print(
        f"2 hosts x 2 ranks, NIC {a.rate} each, {r['mib']:.0f} MiB gathered: flat "
        f"{r['flat']:.3f} s, hierarchical {r['hierarchical']:.3f} s, "
        f"ratio flat/hierarchical {r['flat'] / r['hierarchical']:.2f} (cross-host phase alone "
        f"{r['across only']:.3f} s)"
    )


if __name__ == "__main__":
    main()
