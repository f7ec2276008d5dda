"""The memory tier in a worker (issue 30): every checkpoint.memory_interval steps each rank hands
its shard of the training state to its node's keeper (triaxis.checkpoint.keeper), and on start
all ranks agree whether to restore from there instead of from storage.

A shard is this rank's own part of what the durable tier saves: the local tensors of the model
and optimizer state (a DTensor's `to_local()`), the schedule position, the RNG state, the data
cursor and the loop's carried state, plus the layout it was written under. It is written
straight from the live tensors into the keeper's tmpfs file (the only copy that blocks the
step), in the raw format of triaxis.checkpoint.rawstate: nothing is pickled either way.

Restoring is for the same layout only: shards are local tensors, so a changed world size or
degree (an elastic restart on fewer nodes) finds the layout differs and every rank falls back
to the durable tier, which reshards. So do a missing or corrupted copy on any rank: the ranks
agree on the tier before anyone loads anything.
"""

from __future__ import annotations

import os
import time

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from triaxis.checkpoint import buddy, dcp_io, keeper, memory_tier
from triaxis.checkpoint import manifest as mf
from triaxis.parallel.host import host_all_gather_object

SOCKET_ENV = "TRIAXIS_KEEPER_SOCKET"
"""The keeper's socket on this node: set by `triaxis launch` for its workers."""


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _tensors(tree, prefix=""):
    """(path, tensor) of every tensor in a state tree, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}/{k}")


class MemoryTier:
    def __init__(
        self, ckpt, interval: int, keep: int, socket_path: str, rank: int, host_group, log
    ):
        self.ckpt, self.interval, self.keep = ckpt, interval, keep
        self.client = keeper.KeeperClient(socket_path)
        self.rank, self.group, self.log = rank, host_group, log
        self.world = ckpt.world_size
        self.last_error: str | None = None
        self.save_s: list[float] = []
        self.holder = ""  # the successor node's buddy server: where this node's replicas go
        self.token = os.environ.get(buddy.TOKEN_ENV, "")
        self._connect_ring()

    def _connect_ring(self) -> None:
        """With a buddy replica: learn every node's buddy server (one gather over the host
        group) and point this node's keeper at the next node's (ring order: node i -> i + 1).
        Torchrun numbers ranks node by node, LOCAL_WORLD_SIZE per node."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        mine = self.client.buddy_address() if self.token else ""
        addresses = self._gather(mine)
        nodes = [addresses[n * local] for n in range(self.world // local)]
        if len(nodes) < 2 or not all(nodes):
            return  # one node, or no buddy servers: no replica
        node = self.rank // local
        self.holder = nodes[(node + 1) % len(nodes)]
        if self.rank % local == 0:
            err = self.client.set_peer(self.holder)
            if err is not None:
                self.log.warn(f"memory tier: no buddy replica for this node ({err})")

    @classmethod
    def of(cls, cfg, ckpt, rank: int, host_group, log) -> MemoryTier | None:
        """The run's memory tier, or None when checkpoint.memory_interval is 0. Without a
        keeper on this node (a bare `triaxis train`) it is off, and the run says so."""
        c = cfg.checkpoint
        if not c.memory_interval:
            return None
        socket_path = os.environ.get(SOCKET_ENV, "")
        if not socket_path:
            log.warn(
                f"checkpoint.memory_interval={c.memory_interval}, but no keeper runs for this "
                f"process ({SOCKET_ENV} is unset: `triaxis launch` starts one per node); the "
                "memory tier is off, only the durable tier is written"
            )
            return None
        return cls(ckpt, c.memory_interval, c.memory_keep, socket_path, rank, host_group, log)

    def _live(self) -> dict:
        """The model and optimizer state whose tensors are the live ones (get_state_dict
        shares them), a DTensor as its local shard."""
        model_sd, optim_sd = get_state_dict(self.ckpt.model, self.ckpt.optimizer)
        optim_sd = {k: v for k, v in optim_sd.items() if k != "param_groups"}
        return {"model": model_sd, "optim": optim_sd}

    # -- saving ------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def save(self, step: int, cursor: int, loop_state: dict) -> float:
        """Hand this rank's shard after `step` to the keeper; returns the seconds it blocked.
        A shard the keeper cannot hold (gone, full) is a warning: the durable tier has it."""
        t0 = time.perf_counter()
        state = _shard_tree(self._live())
        state["train"] = self._train_state(step, cursor)
        state["loop_state"] = loop_state
        state["written_under"] = self._layout()
        err = self.client.put_state(step, self.rank, state)
        if err is not None and err != self.last_error:  # once per kind of failure, not per save
            self.log.warn(f"memory tier: step {step} not held ({err}); the durable tier goes on")
        self.last_error = err
        took = time.perf_counter() - t0
        self.save_s.append(took)
        return took

    def _train_state(self, step: int, cursor: int) -> dict:
        return {
            "step": step,
            "cursor": cursor,
            "scheduler": self.ckpt.scheduler.state_dict()["last_epoch"],
            "rng": torch.get_rng_state(),
        }

    def _layout(self) -> dict:
        # The rank too: a shard restores only the rank that wrote it.
        return {"layout": self.ckpt.layout, "model": self.ckpt.model_args, "rank": self.rank}

    # -- restoring ---------------------------------------------------------------------------
    def restore(self) -> dict | None:
        """Restore from the keeper when, on every rank, it holds a step at least as new as the
        newest durable checkpoint, intact and written under this layout; returns {"step",
        "cursor", "loop_state"}, or None (the caller resumes from the durable tier)."""
        held = self.client.steps() or {}
        mine = [s for s, ranks in held.items() if self.rank in ranks]
        # A replaced node's keeper is empty: its ranks' shards live on at the next node.
        replicas = buddy.replica_steps(self.holder, self.token, self.rank) if self.holder else []
        found = mf.list_checkpoints(self.ckpt.root)
        durable = found[-1].step if found else None
        steps = sorted({*mine, *replicas})
        if self.group is not None:
            choice = memory_tier.agree(steps, durable, 2 * self.keep, self.group)
        else:
            choice = memory_tier.choose([steps], durable)
        if choice.tier != "memory":
            if steps:
                self.log.info(
                    f"memory tier: holds steps {steps} for this rank, none newer than the "
                    f"durable step {durable} on every rank; restoring from the durable tier"
                )
            return None
        where = "the keeper on this node"
        if choice.step not in mine:
            where = f"the buddy replica at {self.holder}"
            fetched = buddy.fetch(self.holder, self.token, choice.step, self.rank)
            # Held here from now on (and replicated on), as if this node had written it.
            if fetched is not None and self.client.put(choice.step, self.rank, fetched) is not None:
                fetched = None
        data = self.client.get(choice.step, self.rank)
        live = self._live()
        shard, problem = None, "missing, or its checksum does not match (corrupted)"
        if data is not None:
            shard = keeper.unpack_state(data)
            problem = self._mismatch(shard, live)
        views = self._gather((problem, where))  # every rank's verdict and source
        bad = [f"rank {r}: {p}" for r, (p, _) in enumerate(views) if p]
        if bad:
            self.log.warn(
                f"memory tier: step {choice.step} not used ({'; '.join(bad[:2])}); restoring "
                "from the durable tier"
            )
            return None
        assert shard is not None
        with torch.no_grad():
            for (_, dst), (_, src) in zip(_tensors(_shard_tree(live)), _tensors(shard)):
                dst.copy_(src)
        if not dcp_io.loaded_in_place(live, self.ckpt.model, self.ckpt.optimizer):
            set_state_dict(
                self.ckpt.model,
                self.ckpt.optimizer,
                model_state_dict=live["model"],
                optim_state_dict={**live["optim"], "param_groups": self._groups()},
            )
        train = shard["train"]
        dcp_io.restore_schedule(self.ckpt.scheduler, self.ckpt.optimizer, int(train["scheduler"]))
        torch.set_rng_state(train["rng"].clone())
        sources = sorted({w for _, w in views})
        if len(sources) > 1:  # say which ranks came from a buddy (a replaced node)
            sources = [
                f"{w}: ranks {[r for r, (_, v) in enumerate(views) if v == w]}" for w in sources
            ]
        self.log.info(
            f"restored from the memory tier ({'; '.join(sources)}) at step {train['step']} "
            f"(sample cursor {train['cursor']}; newest durable step: {durable})"
        )
        return {
            "step": int(train["step"]),
            "cursor": int(train["cursor"]),
            "loop_state": shard.get("loop_state") or {},
        }

    def _groups(self) -> list:
        return get_state_dict(self.ckpt.model, self.ckpt.optimizer)[1]["param_groups"]

    def _mismatch(self, shard: dict, live: dict) -> str | None:
        if shard.get("written_under") != self._layout():
            return "written under another layout, model or rank (a relayout restores from durable)"
        want = [(p, t.shape, t.dtype) for p, t in _tensors(_shard_tree(live))]
        got = [(p, t.shape, t.dtype) for p, t in _tensors({k: shard[k] for k in live})]
        if want != got:
            return "its tensors differ from this run's (names, shapes or dtypes)"
        return None

    def _gather(self, value):
        if self.group is None:
            return [value]
        return host_all_gather_object(value, self.group, self.world)


def _shard_tree(tree):
    """`tree` with every DTensor as its local tensor (the same storage)."""
    if isinstance(tree, torch.Tensor):
        return _local(tree)
    if isinstance(tree, dict):
        return {k: _shard_tree(v) for k, v in tree.items()}
    return tree
