"""Framework overhead: triaxis's `Trainer` against a minimal hand-written loop, in one run.

    python bench/framework_overhead.py [--preset small] [--seq 256] [--steps 12] [--rounds 4]

Both sides train the same model in the same layout in the same worker processes: one process,
then dp_shard=2 (FSDP2 over gloo on CPU, forked workers). The minimal loop is what a user would
write by hand: the model built on meta, `fully_shard` per block then the root (as
parallel/parallelize.py), materialized and initialised by the model's own methods, AdamW
(foreach, decay on matrices), the fused chunked head + loss (model/loss.py via the model's
forward), gradient clipping and the LR schedule, batches already in memory, no logging. Its first
step's loss must equal the Trainer's (same weights, same batch): the check that both train the
same thing.

Each round runs both loops for --steps steps, alternating which goes first; a loop's step time
is the mean interval between successive step starts after the first --warmup steps (so the
Trainer's logging every metrics.log_every steps is paid in it), and the table shows the median
over rounds. The Trainer runs with its defaults (numerics guard, metrics every 10 steps, the
watchdog, preemption and checkpoint polling) except that it writes no checkpoint and no
TensorBoard. Its bookkeeping is timed as well: the data loader (the dataset's reads), metrics
(the logged record and its writers) and polling (checkpoint poll, preemption check, watchdog
beat), each as a share of its step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.dist import run_workers  # noqa: E402


def train_config(a: argparse.Namespace, world: int, run_dir: str):
    from triaxis.config import load_config

    return load_config(
        None,
        [
            f"--model.preset={a.preset}",
            f"--data.path={a.data}",
            f"--data.seq_len={a.seq}",
            f"--train.run_dir={run_dir}",
            f"--train.steps={a.steps}",
            f"--train.global_batch={a.global_batch}",
            f"--train.micro_batch={a.micro_batch}",
            "--train.device=cpu",
            "--train.val_every=0",
            f"--parallel.dp_shard={world}",
            "--checkpoint.interval=0",
            "--checkpoint.save_final=false",
            "--metrics.tensorboard=false",
            "--metrics.progress=false",
        ],
    )


CLOCKS = ("wall", "cpu")
"""Wall time is what a step costs; on a shared, loaded machine it is mostly other jobs' time, so
the process's CPU time (gloo waits block, they do not spin) is reported beside it."""


def now() -> dict[str, float]:
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def since(t0: dict[str, float]) -> dict[str, float]:
    t = now()
    return {c: t[c] - t0[c] for c in CLOCKS}


class Timed:
    """Wraps obj.name (an instance or a class attribute) to add its time to a bucket."""

    def __init__(self, buckets: dict[str, dict[str, float]]):
        self.buckets, self.undo = buckets, []

    def wrap(self, obj, name: str, bucket: str) -> None:
        if not hasattr(obj, name):
            return  # a helper renamed it: that part is then simply not timed
        fn = getattr(obj, name)
        inst = not isinstance(obj, type)

        def timed(*args, **kwargs):
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                for c, dt in since(t0).items():
                    self.buckets[bucket][c] += dt

        setattr(obj, name, timed)
        self.undo.append((obj, name, fn if not inst else None))

    def restore(self) -> None:
        for obj, name, fn in reversed(self.undo):
            if fn is None:
                delattr(obj, name)
            else:
                setattr(obj, name, fn)
        self.undo.clear()


def run_trainer(trainer, steps: int, warmup: int) -> tuple[dict, dict, float]:
    """One fit() of `steps` steps: ({clock: mean step s}, {clock: {part: share of step time}},
    first loss)."""
    from triaxis.metrics import logger as metrics_logger
    from triaxis.train import loop, resilience, watchdog

    starts: list[dict[str, float]] = []
    buckets = {k: dict.fromkeys(CLOCKS, 0.0) for k in ("data", "metrics", "polling")}
    timer = Timed(buckets)
    step_fn = trainer.train_step

    def train_step(*args, **kwargs):
        starts.append(now())
        if len(starts) == warmup + 1:
            for b in buckets.values():
                b.update(dict.fromkeys(CLOCKS, 0.0))  # count from the first measured step on
        return step_fn(*args, **kwargs)

    trainer.train_step = train_step
    timer.wrap(trainer.train_ds, "batch", "data")
    timer.wrap(trainer, "_record", "metrics")
    timer.wrap(metrics_logger.MetricsWriter, "write", "metrics")
    timer.wrap(metrics_logger.Progress, "update", "metrics")
    timer.wrap(trainer.ckpt, "poll", "polling")
    timer.wrap(
        getattr(loop, "PreemptionWatch", resilience.PreemptionWatch), "should_stop", "polling"
    )
    timer.wrap(watchdog.Watchdog, "beat", "polling")
    try:
        result = trainer.fit()
    finally:
        timer.restore()
        del trainer.train_step
    total = since(starts[warmup])  # to the loop's end: the last step's logging included
    n = len(starts) - 1 - warmup
    step_s = {c: (starts[-1][c] - starts[warmup][c]) / n for c in CLOCKS}
    shares = {c: {k: b[c] / total[c] for k, b in buckets.items()} for c in CLOCKS}
    return step_s, shares, result.losses[min(result.losses)]


class MinimalLoop:
    """The hand-written loop: the same model, wrapping, optimizer, loss and batches."""

    def __init__(self, trainer, world: int):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from triaxis.model import Transformer
        from triaxis.train.optim import lr_factor

        cfg = trainer.cfg
        self.cfg, self.accum = cfg, trainer.grad_accum
        with torch.device("meta"):
            model = Transformer(trainer.model_args)
        if world > 1:
            mesh = init_device_mesh("cpu", (world,))
            blocks = list(model.layers.values())
            for i, block in enumerate(blocks):
                fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1)
            # Explicit, as triaxis passes it (parallel.reshard_after_forward): FSDP's own
            # default would keep the root (embedding, head) gathered from forward to backward.
            fully_shard(model, mesh=mesh, reshard_after_forward=True)
        model.materialize("cpu")
        model.init_weights(cfg.train.seed)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        other = [p for p in model.parameters() if p.ndim < 2]
        t = cfg.train
        self.model = model
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": other}],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            eps=1e-8,
            weight_decay=0.0,
            foreach=True,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, t))
        # The Trainer's batches for every step, read up front: no loader inside the loop.
        self.batches = [
            [
                trainer.local_batch(trainer.train_ds, s * t.global_batch, m)
                for m in range(self.accum)
            ]
            for s in range(t.steps)
        ]
        trainer.data_wait_s = 0.0

    def run(self, steps: int, warmup: int) -> tuple[dict, float]:
        """({clock: mean step s after warm-up}, first step's loss)."""
        chunk, first = self.cfg.train.loss_chunk_tokens, None
        starts = []
        for step in range(steps):
            starts.append(now())
            total = torch.zeros(())
            for inputs, targets in self.batches[step]:
                loss = self.model(inputs, targets=targets, loss_chunk=chunk)
                (loss / self.accum).backward()
                total += loss.detach() / self.accum
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            torch.nn.utils.clip_grads_with_norm_(
                list(self.model.parameters()), self.cfg.train.grad_clip, norm
            )
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            if first is None:
                if torch.distributed.is_initialized():
                    torch.distributed.all_reduce(total)
                    total /= torch.distributed.get_world_size()
                first = float(total)
        starts.append(now())
        return {c: (starts[-1][c] - starts[warmup][c]) / (steps - warmup) for c in CLOCKS}, first


def worker(rank: int, world: int, a: argparse.Namespace) -> dict:
    from triaxis.train.distributed import init_distributed
    from triaxis.train.loop import Trainer

    rows: dict[str, list] = {"triaxis": [], "minimal": [], "shares": [], "loss": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = tmp if rank == 0 else tmp + f"/r{rank}"
        cfg = train_config(a, world, run_dir)
        for r in range(a.rounds):
            # Fresh models each round: both sides start from the same initial weights.
            trainer = Trainer(cfg, init_distributed("cpu"))
            minimal = MinimalLoop(trainer, world)
            order = ("triaxis", "minimal") if r % 2 == 0 else ("minimal", "triaxis")
            losses = {}
            for side in order:
                if side == "triaxis":
                    step_s, shares, losses[side] = run_trainer(trainer, a.steps, a.warmup)
                    rows["shares"].append(shares)
                else:
                    step_s, losses[side] = minimal.run(a.steps, a.warmup)
                rows[side].append(step_s)
            rows["loss"].append(losses)
            del trainer, minimal
    return rows


def summarize(world: int, rows: dict) -> dict:
    out: dict = {"world": world, "first_loss": rows["loss"][0]}
    for c in CLOCKS:
        t = [r[c] for r in rows["triaxis"]]
        m = [r[c] for r in rows["minimal"]]
        out[c] = {
            "triaxis_step_s": statistics.median(t),
            "minimal_step_s": statistics.median(m),
            "ratio": statistics.median(t) / statistics.median(m),
            "ratio_per_round": [round(a / b, 4) for a, b in zip(t, m)],
            "shares": {
                k: statistics.median(s[c][k] for s in rows["shares"]) for k in rows["shares"][0][c]
            },
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default="synthetic", help="a prepared folder, or synthetic")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--worlds", default="1,2")
    a = ap.parse_args()
    out = []
    for world in map(int, a.worlds.split(",")):
        ranks = run_workers(worker, world, a, timeout_s=3600)
        s = summarize(world, ranks[0])
        out.append(s)
        if abs(s["first_loss"]["triaxis"] - s["first_loss"]["minimal"]) > 1e-4:
            raise SystemExit(f"world {world}: the two loops trained different things: {s}")
        for c in CLOCKS:
            r = s[c]
            parts = ", ".join(f"{k} {v:.2%}" for k, v in r["shares"].items())
            print(
                f"world {world}, {c:>4} time: triaxis {r['triaxis_step_s'] * 1e3:.1f} ms/step, "
                f"minimal {r['minimal_step_s'] * 1e3:.1f} ms/step, ratio {r['ratio']:.3f}x "
                f"(rounds {r['ratio_per_round']}); of the Trainer's step: {parts}",
                flush=True,
            )
    print(
        json.dumps(
            {
                "preset": a.preset,
                "seq": a.seq,
                "global_batch": a.global_batch,
                "micro_batch": a.micro_batch,
                "steps": a.steps,
                "rounds": a.rounds,
                "results": out,
            }
        )
    )


if __name__ == "__main__":
    main()
