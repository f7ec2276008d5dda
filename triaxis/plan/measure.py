"""Measure per-rank bytes of parameters, gradients and AdamW states of a real triaxis layout on
CPU, without N processes: one process joins a *fake* process group (collectives are no-ops) as
rank `rank` of `world`, builds the model on meta, applies triaxis.parallel.parallelize, runs one
forward, backward and optimizer step, and sums the local tensors. Shapes and placements are
exactly those of a real run; values are not (and do not matter here).

Used by tests/test_plan_memory.py and bench/plan_memory.py to check
`predict_state_bytes_per_rank` (the memory model's state part) against the real sharding.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class MeasuredLayout:
    preset: str
    dp_replicate: int
    dp_shard: int
    tp: int
    tied: bool | None = None
    """Override the preset's tie_embeddings (None = keep it)."""

    def model_args(self):
        import dataclasses

        from triaxis.model.presets import PRESETS

        args = dataclasses.replace(PRESETS[self.preset])
        if self.tied is not None:
            args.tie_embeddings = self.tied
        return args

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def measure(layouts: list[MeasuredLayout], rank: int = 0) -> list[dict[str, int]]:
    """Bytes rank `rank` holds in each layout (all of one world size): params, grads, optim.

    One fake process group serves all layouts: DTensor caches process groups by name, so a
    process cannot re-create its default group; measure each world size in its own process.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    worlds = {m.world_size for m in layouts}
    assert len(worlds) == 1, f"one world size per call, got {sorted(worlds)}"
    world = worlds.pop()
    if world > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        return [_measure_one(m) for m in layouts]
    finally:
        if world > 1:
            dist.destroy_process_group()


def _measure_one(m: MeasuredLayout) -> dict[str, int]:
    import torch

    from triaxis.config import ParallelConfig, TrainConfig
    from triaxis.model import Transformer
    from triaxis.parallel.dims import ParallelDims
    from triaxis.parallel.parallelize import parallelize
    from triaxis.train.optim import build_optimizer

    args = m.model_args()
    dims = ParallelDims(m.dp_replicate, m.dp_shard, m.tp, 1, m.world_size)
    mesh = None
    if m.world_size > 1:
        mesh = dims.build_mesh("cpu")
        mesh = mesh[0] if isinstance(mesh, tuple) else mesh  # (world mesh, dp mesh)
    with torch.device("meta"):
        model = Transformer(args)
    pcfg = ParallelConfig(dp_replicate=m.dp_replicate, dp_shard=m.dp_shard, tp=m.tp)
    model = parallelize(model, dims, mesh, pcfg, TrainConfig(), torch.device("cpu"), None)
    if hasattr(model, "materialize"):
        model.materialize("cpu")  # keeps tied weights tied
    else:
        model.to_empty(device="cpu")
    model.init_weights(0)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    model(torch.randint(0, args.vocab_size, (1, 8))).float().sum().backward()
    opt.step()
    params = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size()
                for p in model.parameters() if p.grad is not None)
    # Every optimizer tensor, the 4-byte `step` scalars included (they are real bytes).
    optim = sum(_local(v).numel() * _local(v).element_size()
                for state in opt.state.values() for v in state.values() if torch.is_tensor(v))
    return {"params": params, "grads": grads, "optim": optim}


if __name__ == "__main__":
    # python -m triaxis.plan.measure RANK PRESET:DR:DS:TP[:tied] [...]: a JSON list on stdout.
    rank, *specs = sys.argv[1:]
    todo = []
    for spec in specs:
        preset, dr, ds, tp, *tied = spec.split(":")
        todo.append(MeasuredLayout(preset, int(dr), int(ds), int(tp),
                                   tied[0] == "tied" if tied else None))
    print(json.dumps(measure(todo, int(rank))))
