"""Which tier a restart restores from: all ranks agree on the newest step that is complete on
ALL ranks, memory (the keepers) against durable (storage), before anyone loads.

A rank only knows which steps its own keeper holds for it; the steps travel as a fixed-length
int64 tensor over the gloo group (no pickled objects), so every rank computes the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

_NONE = -1


@dataclass(frozen=True)
class Choice:
    tier: str
    """"memory", "durable" or "none" (a fresh start)."""
    step: int
    """The step to restore (-1 with tier "none")."""


def choose(memory_steps_per_rank: list[list[int]], durable_step: int | None) -> Choice:
    """The newest step every rank holds in memory, unless the durable checkpoint is as new; a
    tie goes to memory (same state, no storage read)."""
    common = set(memory_steps_per_rank[0]) if memory_steps_per_rank else set()
    for steps in memory_steps_per_rank[1:]:
        common &= set(steps)
    common.discard(_NONE)
    mem = max(common) if common else None
    if mem is not None and (durable_step is None or mem >= durable_step):
        return Choice("memory", mem)
    if durable_step is not None:
        return Choice("durable", durable_step)
    return Choice("none", _NONE)


def agree(local_steps: list[int], durable_step: int | None, keep: int, group) -> Choice:
    """choose() over every rank's memory steps, gathered on the host `group`
    (parallel.host.new_host_group: host values never go through NCCL). Every rank must pass
    the same `keep`."""
    import torch
    import torch.distributed as dist

    from triaxis.parallel.host import host_all_gather, host_all_reduce

    newest = sorted(local_steps, reverse=True)[:keep]
    mine = torch.full((keep,), _NONE, dtype=torch.int64)
    if newest:
        mine[: len(newest)] = torch.tensor(newest, dtype=torch.int64)
    gathered = host_all_gather(mine, group)
    # The durable step is the one every rank can see; a rank that sees none (or an older one)
    # wins, so no rank is asked to load what it cannot find.
    durable = torch.tensor([_NONE if durable_step is None else durable_step], dtype=torch.int64)
    host_all_reduce(durable, group, op=dist.ReduceOp.MIN)
    d = int(durable.item())
    return choose([t.tolist() for t in gathered], None if d == _NONE else d)


def footprint_bytes(state_bytes_per_rank: int, local_ranks: int, keep: int) -> int:
    """Host memory one node's keeper holds at most: `keep` steps of every local rank's shard,
    plus one more step in flight (a step is only evicted once its successor has arrived)."""
    return state_bytes_per_rank * local_ranks * (keep + 1)


def check_fits(
    state_bytes_per_rank: int, local_ranks: int, keep: int, host_bytes: int, share: float = 0.5
) -> None:
    """Raise UserError (one line: value, rule, fix) when the keeper would take more than
    `share` of the node's memory (the workers and the page cache need the rest)."""
    from triaxis.errors import UserError

    need = footprint_bytes(state_bytes_per_rank, local_ranks, keep)
    if need > share * host_bytes:
        gib = 1 << 30
        raise UserError(
            f"checkpoint.memory_keep={keep}: the memory tier needs {need / gib:.1f} GiB per node "
            f"({local_ranks} ranks x {state_bytes_per_rank / gib:.2f} GiB x {keep + 1} steps), "
            f"over {share:.0%} of the node's {host_bytes / gib:.1f} GiB; lower "
            "checkpoint.memory_keep, shard the state over more ranks, or set "
            "checkpoint.memory_interval=0"
        )
