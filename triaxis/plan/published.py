"""Published results as data (data/published.toml) and the cost model's prediction of each.

The published models are GPT-style: a 4h GELU MLP, multi-head attention, dropout, tied
embeddings; they are described by a ModelShape (not ModelArgs, which is SwiGLU-only). Each row is
evaluated at its published layout; a row whose micro-batch is 0 leaves the micro-batch and the
partition-group size to the planner (the paper does not state them), over that row's runtime.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from triaxis.plan.cost import Plan, Problem, evaluate
from triaxis.plan.hardware import load_catalog, resolve_hardware
from triaxis.plan.layout import RUNTIMES, Layout, divisors
from triaxis.plan.shape import ModelShape

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
    return ModelShape(name=row["name"], dim=h, n_layers=row["n_layers"], n_heads=row["n_heads"],
                      n_kv_heads=row["n_heads"], ffn_dim=4 * h, vocab_size=row["vocab_size"],
                      gated_mlp=False, tie_embeddings=True, dropout=True)


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
        layout = Layout(dp, 1, tp, pp, row["micro_batch"], "full", 2, row["schedule"],
                        row["virtual_stages"])
        plan = evaluate(problem, layout)
    else:
        plan = _best_sharded(shape, hw, rt, row, dp, row.get("checkpoint_offload", False))
    return Prediction(row["name"], row["source"], row["published_tflops"],
                      plan.hw_tflops_per_gpu, plan, row["assumptions"])


def _best_sharded(shape, hw, rt, row, dp, offload_checkpoints: bool = False) -> Plan:
    """The fastest fitting MiCS layout (partition size x micro-batch), full recomputation,
    block inputs kept on the GPU or (as published for the row) offloaded to the host."""
    best = None
    for shard in divisors(dp):
        for mb in (1, 2, 3, 4, 6, 8, 16):
            batch = dp * mb * ACCUMULATION_WHEN_UNSTATED
            problem = Problem(shape, hw, rt, row["seq_len"], batch)
            layout = Layout(dp // shard, shard, 1, 1, mb, "full",
                            offload_checkpoints=offload_checkpoints)
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
    flops = tokens * (shape.model_flops_per_token(row["seq_len"]) +
                      shape.recompute_flops_per_token(row["seq_len"], shape.n_layers))
    return flops / seconds / 1e12


def predict_all() -> list[Prediction]:
    return [predict_row(r) for r in load_rows()]


def table(predictions: list[Prediction]) -> str:
    lines = ["| model | layout | published TFLOP/s | predicted | error |", "|---|---|---|---|---|"]
    for p in predictions:
        lines.append(f"| {p.name} | {p.plan.layout.describe()} | {p.published_tflops:.0f} | "
                     f"{p.predicted_tflops:.0f} | {p.error:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(predict_all()))
