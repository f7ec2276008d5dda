"""Predicted vs measured peak GPU memory of real triaxis layouts (needs CUDA GPUs).

    python bench/plan_gpu_memory.py --preset 1b --seq 2048 --micro-batch 2 --ac full
    torchrun --nproc-per-node 8 bench/plan_gpu_memory.py --preset 8b --dp-shard 4 --tp 2 ...
    python bench/plan_gpu_memory.py ... --dry-run     # the prediction only (runs on CPU)

Builds the model with triaxis.parallel.parallelize exactly as training does (bf16 FSDP mixed
precision, or autocast on one GPU), runs three optimizer steps on random tokens, and compares
torch.cuda.max_memory_allocated with the planner's peak for the same layout (memory_of, without
the allocator reserve). The issue asks for agreement within 15%; record runs in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os


def predicted_gib(a: argparse.Namespace, gpu: str) -> tuple[float, dict]:
    from triaxis.plan.hardware import GIB, load_catalog, resolve_hardware
    from triaxis.plan.memory import memory_of
    from triaxis.plan.problem import Layout, Problem, load_model
    from triaxis.plan.runtimes import RUNTIMES

    world = a.dp_replicate * a.dp_shard * a.tp
    shape, _ = load_model(a.preset)
    hw = resolve_hardware(load_catalog(), gpu, None, gpus_per_node=min(world, 8))
    problem = Problem(
        shape, hw, RUNTIMES["triaxis"], a.seq, a.micro_batch * a.dp_replicate * a.dp_shard
    )
    layout = Layout(a.dp_replicate, a.dp_shard, a.tp, 1, a.micro_batch, a.ac, a.ac_every)
    m = memory_of(problem, layout, 1)
    parts = {
        k: getattr(m, k) / GIB for k in ("params", "grads", "optim", "activations", "comm_buffers")
    }
    return m.total / GIB, parts


def measured_gib(a: argparse.Namespace) -> float:
    import torch

    from triaxis.config import ParallelConfig, TrainConfig
    from triaxis.model import Transformer
    from triaxis.model.presets import PRESETS
    from triaxis.parallel.dims import ParallelDims
    from triaxis.parallel.parallelize import parallelize
    from triaxis.train.distributed import init_distributed, shutdown
    from triaxis.train.optim import build_optimizer

    env = init_distributed("cuda")
    args = PRESETS[a.preset]
    dims = ParallelDims(a.dp_replicate, a.dp_shard, a.tp, 1, env.world_size)
    mesh = dims.build_mesh("cuda") if env.world_size > 1 else None
    mesh = mesh[0] if isinstance(mesh, tuple) else mesh
    pcfg = ParallelConfig(
        dp_replicate=a.dp_replicate,
        dp_shard=a.dp_shard,
        tp=a.tp,
        activation_checkpoint=a.ac,
        ac_every=a.ac_every,
        loss_parallel=a.tp > 1,
    )
    with torch.device("meta"):
        model = Transformer(args)
    fsdp = dims.fsdp_enabled
    model = parallelize(
        model, dims, mesh, pcfg, TrainConfig(), env.device, torch.bfloat16 if fsdp else None
    )
    model.materialize(env.device) if hasattr(model, "materialize") else model.to_empty(
        device=env.device
    )
    model.init_weights(0)
    opt = build_optimizer(model, TrainConfig(), env.device)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        tokens = torch.randint(0, args.vocab_size, (a.micro_batch, a.seq + 1), device=env.device)
        ctx = (
            torch.autocast("cuda", torch.bfloat16)
            if not fsdp
            else torch.autocast("cuda", enabled=False)
        )
        if a.tp == 1:  # as the trainer does: the fused, chunked head + loss
            with ctx:
                loss = model(
                    tokens[:, :-1],
                    targets=tokens[:, 1:],
                    loss_chunk=TrainConfig().loss_chunk_tokens,
                )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            continue
        with ctx:
            logits = model(tokens[:, :-1])
        if a.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            with loss_parallel():
                loss = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), tokens[:, 1:].flatten()
                )
                loss.backward()
        else:
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), tokens[:, 1:].flatten()
            ).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    shutdown(env)
    return peak


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--dp-replicate", type=int, default=1)
    ap.add_argument("--dp-shard", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ac", default="full", choices=["none", "selective", "full"])
    ap.add_argument("--ac-every", type=int, default=2)
    ap.add_argument("--gpu", default="h100", help="hardware profile for the prediction")
    ap.add_argument("--dry-run", action="store_true", help="print the prediction only")
    a = ap.parse_args()
    if (
        a.dp_shard * a.dp_replicate * a.tp != int(os.environ.get("WORLD_SIZE", "1"))
        and not a.dry_run
    ):
        ap.error("dp_replicate x dp_shard x tp must equal the number of processes")
    pred, parts = predicted_gib(a, a.gpu)
    print(f"predicted peak {pred:.2f} GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    if not a.dry_run:
        got = measured_gib(a)
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"measured peak {got:.2f} GiB (max_memory_allocated); predicted/measured "
                f"= {pred / got:.3f}"
            )
