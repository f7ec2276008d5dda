"""What the cost model is checked against: published training throughputs and the per-rank
bytes of real triaxis layouts.

Published: results as data (data/published.toml) and the cost model's prediction of each.

The published models are GPT-style: a 4h GELU MLP, multi-head attention, dropout, tied
embeddings; they are described by a ModelShape (not ModelArgs, which is SwiGLU-only). Each row is
evaluated at its published layout; a row whose micro-batch is 0 leaves the micro-batch and the
partition-group size to the planner (the paper does not state them), over that row's runtime.

Measured: per-rank bytes of parameters, gradients and AdamW states of a real triaxis layout on
CPU, without N processes: one process joins a *fake* process group (collectives are no-ops) as
rank `rank` of `world`, builds the model on meta, applies triaxis.parallel.parallelize, runs one
forward, backward and optimizer step, and sums the local tensors. Shapes and placements are
exactly those of a real run; values are not (and do not matter here).

Used by tests/test_plan_memory.py and bench/plan_memory.py (through `python -m
triaxis.plan.evidence measure ...`, one process per world size) to check
`predict_state_bytes_per_rank` (the memory model's state part) against the real sharding.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from triaxis.plan.hardware import load_catalog, resolve_hardware
from triaxis.plan.layouts import divisors
from triaxis.plan.problem import Layout, ModelShape, Plan, Problem
from triaxis.plan.runtimes import RUNTIMES
from triaxis.plan.search import evaluate

# ---------------------------------------------------------------------------------------------
# Published results


ACCUMULATION_WHEN_UNSTATED = 8
"""Micro-batches per step assumed for rows that do not state their global batch."""


@dataclass
class Prediction:
    name: str
    source: str
    published_tflops: float
    predicted_tflops: float
    plan: Plan
    assumptions: str

    @property
    def error(self) -> float:
        """Relative error of the prediction: (predicted - published) / published."""
        return self.predicted_tflops / self.published_tflops - 1


def load_rows() -> list[dict[str, Any]]:
    text = resources.files("triaxis.plan").joinpath("data/published.toml").read_text()
    return tomllib.loads(text)["row"]


def row_shape(row: dict[str, Any]) -> ModelShape:
    h = row["dim"]
    return ModelShape(
        name=row["name"],
        dim=h,
        n_layers=row["n_layers"],
        n_heads=row["n_heads"],
        n_kv_heads=row["n_heads"],
        ffn_dim=4 * h,
        vocab_size=row["vocab_size"],
        gated_mlp=False,
        tie_embeddings=True,
        dropout=True,
    )


def predict_row(row: dict[str, Any]) -> Prediction:
    catalog = load_catalog()
    hw = resolve_hardware(catalog, None, row["cluster"])
    rt = dataclasses.replace(RUNTIMES[row["runtime"]], dp_overlap=row["dp_overlap"])
    shape = row_shape(row)
    tp, pp, gpus = row["tp"], row["pp"], row["gpus"]
    dp = gpus // (tp * pp)
    if row["micro_batch"]:
        problem = Problem(shape, hw, rt, row["seq_len"], row["global_batch"])
        # Megatron 2021 has no sharded states: its data-parallel axis is dp_replicate.
        layout = Layout(
            dp, 1, tp, pp, row["micro_batch"], "full", 2, row["schedule"], row["virtual_stages"]
        )
        plan = evaluate(problem, layout)
    else:
        plan = _best_sharded(shape, hw, rt, row, dp, row.get("checkpoint_offload", False))
    return Prediction(
        row["name"],
        row["source"],
        row["published_tflops"],
        plan.hw_tflops_per_gpu,
        plan,
        row["assumptions"],
    )


def _best_sharded(shape, hw, rt, row, dp, offload_checkpoints: bool = False) -> Plan:
    """The fastest fitting MiCS layout (partition size x micro-batch), full recomputation,
    block inputs kept on the GPU or (as published for the row) offloaded to the host."""
    best = None
    for shard in divisors(dp):
        for mb in (1, 2, 3, 4, 6, 8, 16):
            batch = dp * mb * ACCUMULATION_WHEN_UNSTATED
            problem = Problem(shape, hw, rt, row["seq_len"], batch)
            layout = Layout(
                dp // shard, shard, 1, 1, mb, "full", offload_checkpoints=offload_checkpoints
            )
            plan = evaluate(problem, layout)
            if plan.fits and (best is None or plan.tokens_per_s > best.tokens_per_s):
                best = plan
    assert best is not None, f"no MiCS layout of {row['name']} fits"
    return best


def traffic_bound_tflops(row: dict[str, Any]) -> float:
    """The TFLOP/s per GPU a sharded-data-parallel row cannot exceed on its network, even with
    free compute and perfect overlap: per micro-batch each node receives the gathered weights
    twice and sends the reduce-scattered gradients once, all but its own 1/(nodes) share through
    its NICs. Compared with the published figure by the tests."""
    hw = resolve_hardware(load_catalog(), None, row["cluster"])
    rt, shape = RUNTIMES[row["runtime"]], row_shape(row)
    params = shape.n_layers * shape.block_params()
    nodes = row["gpus"] // hw.gpus_per_node
    per_node = (2 * rt.gather_bytes + rt.grad_reduce_bytes) * params * (1 - 1 / nodes)
    seconds = per_node / hw.cluster.network_bytes_per_s
    tokens = row["seq_len"]  # micro-batch 1: the most that fits (see published.toml)
    flops = tokens * (
        shape.model_flops_per_token(row["seq_len"])
        + shape.recompute_flops_per_token(row["seq_len"], shape.n_layers)
    )
    return flops / seconds / 1e12


def predict_all() -> list[Prediction]:
    return [predict_row(r) for r in load_rows()]


def table(predictions: list[Prediction]) -> str:
    lines = ["| model | layout | published TFLOP/s | predicted | error |", "|---|---|---|---|---|"]
    for p in predictions:
        lines.append(
            f"| {p.name} | {p.plan.layout.describe()} | {p.published_tflops:.0f} | "
            f"{p.predicted_tflops:.0f} | {p.error:+.1%} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measured per-rank state bytes


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
    grads = sum(
        _local(p.grad).numel() * _local(p.grad).element_size()
        for p in model.parameters()
        if p.grad is not None
    )
    # Every optimizer tensor, the 4-byte `step` scalars included (they are real bytes).
    optim = sum(
        _local(v).numel() * _local(v).element_size()
        for state in opt.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    return {"params": params, "grads": grads, "optim": optim}


if __name__ == "__main__":
    # python -m triaxis.plan.evidence: the published rows and their predictions (a table).
    # python -m triaxis.plan.evidence measure RANK PRESET:DR:DS:TP[:tied] [...]: the measured
    # bytes of each layout, a JSON list on stdout.
    if sys.argv[1:2] == ["measure"]:
        rank, *specs = sys.argv[2:]
        todo = []
        for spec in specs:
            preset, dr, ds, tp, *tied = spec.split(":")
            todo.append(
                MeasuredLayout(
                    preset, int(dr), int(ds), int(tp), tied[0] == "tied" if tied else None
                )
            )
        print(json.dumps(measure(todo, int(rank))))
    else:
        print(table(predict_all()))
