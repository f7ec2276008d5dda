"""The resilience matrix's harness (tests/test_resilience_matrix.py): the layouts and options it
covers, forked ranks that can be SIGKILLed for real, the relaunch that resumes by itself, and the
comparison of every logged loss with the single-process uninterrupted run.

Ranks are forked workers (tests/dist.py style): real processes, so a SIGKILL is a real one, but
without torch's import cost. When one dies, the harness kills the others, as torchrun's agent
does before a restart.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from pathlib import Path
from queue import Empty

import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401  (imported before forking: see below)
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.pipelining  # noqa: F401
import torch.distributed.tensor.parallel  # noqa: F401

from tests.dist import WAIT_S, free_port, init_gloo
from triaxis.checkpoint import manifest as mf
from triaxis.config import load_config
from triaxis.parallel.partition import MULTI, SINGLE, stages_per_rank
from triaxis.train.distributed import init_distributed
from triaxis.train.loop import Trainer  # imported once here, not in every forked rank

LAUNCH_TIMEOUT_S = WAIT_S
"""Outer bound of one launch (all ranks): a hang detector. A run takes a few seconds idle, and
up to 10x that on a 2-core machine shared with other CPU-heavy jobs."""

BASE = {
    "model.preset": "tiny",
    "model.n_layers": "4",
    "model.tie_embeddings": "false",
    "data.seq_len": "32",
    "train.steps": "8",
    "train.lr": "3e-3",
    "train.warmup_steps": "2",
    "train.global_batch": "8",
    "train.device": "cpu",
    "train.val_every": "0",
    "train.val_batches": "1",
    "checkpoint.interval": "2",
    "metrics.log_every": "1",
    "metrics.tensorboard": "false",
    "metrics.progress": "false",
}
KILL_STEP = 6
"""Rank 1 SIGKILLs itself as step 6 starts: after the checkpoints of steps 2 and 4 (async:
either may be the latest committed one; both must give the same numbers)."""

# Layout families: (world, degrees). Gradient accumulation is 2 or 4 in every one of them.
SCHEDULES = {name: stages_per_rank(name, 2) for name in (*SINGLE, *MULTI)}  # every schedule
LAYOUTS = {
    "single": (1, {"train.micro_batch": "4"}),
    "dp_shard": (2, {"parallel.dp_shard": "2", "train.micro_batch": "2"}),
    "hsdp": (4, {"parallel.dp_replicate": "2", "parallel.dp_shard": "2", "train.micro_batch": "1"}),
    "tp": (2, {"parallel.tp": "2", "parallel.dp_shard": "1", "train.micro_batch": "4"}),
    "tp_loss_parallel": (
        2,
        {
            "parallel.tp": "2",
            "parallel.dp_shard": "1",
            "parallel.loss_parallel": "true",
            "train.micro_batch": "4",
        },
    ),
    **{
        f"pp_{name}": (
            2,
            {
                "parallel.pp": "2",
                "parallel.dp_shard": "1",
                "parallel.pp_schedule": name,
                "parallel.pp_virtual_stages": str(v),
                "train.micro_batch": "2",
            },
        )
        for name, v in SCHEDULES.items()
    },
    "pp_dp": (4, {"parallel.pp": "2", "parallel.dp_shard": "2", "train.micro_batch": "1"}),
    "ep": (2, {"parallel.ep": "2", "parallel.dp_shard": "2", "train.micro_batch": "2"}),
    "pp_tp": (
        4,
        {
            "parallel.pp": "2",
            "parallel.tp": "2",
            "parallel.dp_shard": "1",
            "train.micro_batch": "2",
        },
    ),
    "pp_tp_dp": (
        8,
        {
            "parallel.pp": "2",
            "parallel.tp": "2",
            "parallel.dp_shard": "2",
            "train.micro_batch": "1",
        },
    ),
}
VAL = {"train.val_every": "2"}
OPTIONS = {
    "plain": {},
    "val": VAL,
    "ac": {**VAL, "parallel.activation_checkpoint": "full"},
    "compile": {"train.compile": "true", "train.compile_backend": "aot_eager"},
    "offload": {**VAL, "parallel.cpu_offload": "true"},
    # A NaN at step 3 rolls back to step 2 and skips that batch; the kill comes later.
    "rollback": {"train.on_bad_loss": "rollback", "env.TRIAXIS_FAULT_NAN": "3"},
    # A mixture of experts with bias balancing (its routing state rides in the checkpoint), in
    # micro-batches of 2 samples everywhere: routing statistics are per micro-batch.
    "moe": {
        **VAL,
        "model.preset": "tiny-moe",
        "model.moe_bias_update_rate": "1e-2",
        "train.micro_batch": "2",
    },
}


# -- the harness ------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, overrides: dict, env: dict, queue) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(
            {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), **env}
        )
        if env.get("TEST_SLOW_SIDECAR_RANK") == str(rank):
            _slow_sidecar()
        if world > 1:
            init_gloo(rank, world, port)
        cfg = load_config(None, [f"--{k}={v}" for k, v in overrides.items()])
        trainer = Trainer(cfg, init_distributed("cpu"))
        result = trainer.fit()
        out = {"final_step": result.final_step, "loop_state": trainer.loop_state()}
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def _slow_sidecar() -> None:
    """This rank writes each save's sidecar (the last step of its part of an async save,
    after the collective ones) a second late: it finishes each async save after the others."""
    from triaxis.checkpoint import manifest

    write_sidecar = manifest.write_sidecar

    def late(*args, **kwargs):
        time.sleep(1.0)
        return write_sidecar(*args, **kwargs)

    manifest.write_sidecar = late


def launch(world: int, overrides: dict, env: dict | None = None) -> list[dict] | None:
    """One launch of `world` ranks. Returns each rank's result, or None when a rank died by
    SIGKILL (the others are then killed too, as an elastic agent would). Raises on an error in
    a rank and on a launch that outlives LAUNCH_TIMEOUT_S (a hang)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, overrides, env or {}, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while len(results) < world:
            if _killed(procs, wait_s=0):
                return None
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"launch of {world} ranks still running after "
                    f"{LAUNCH_TIMEOUT_S}s: a hang ({overrides})"
                )
            try:
                rank, status, out = queue.get(timeout=0.2)
            except Empty:  # look at the processes again
                continue
            if status == "error":
                # A peer's SIGKILL breaks this rank's collective: the kill is what happened.
                if _killed(procs, wait_s=10):
                    return None
                raise AssertionError(f"rank {rank} failed:\n{out}")
            results[rank] = pickle.loads(out)
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == world else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


def _killed(procs, wait_s: float) -> bool:
    """Whether a rank has died by SIGKILL, waiting up to wait_s for it to be seen."""
    deadline = time.monotonic() + wait_s
    while True:
        if any(p.exitcode == -signal.SIGKILL for p in procs):
            return True
        if time.monotonic() > deadline or all(p.exitcode is not None for p in procs):
            return False
        time.sleep(0.05)


def config(
    data: str, run_dir: Path, layout: str, option: str = "plain", **extra: str
) -> tuple[int, dict, dict]:
    """(world, overrides, env) of one run."""
    world, degrees = LAYOUTS[layout]
    values = {
        **BASE,
        "data.path": data,
        "train.run_dir": str(run_dir),
        **degrees,
        **OPTIONS[option],
        **extra,
    }
    env = {k[4:]: v for k, v in values.items() if k.startswith("env.")}
    return world, {k: v for k, v in values.items() if not k.startswith("env.")}, env


def logged(run_dir: Path) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Every loss and validation loss in metrics.jsonl, all records of each step (a resumed
    run logs the steps after its checkpoint again)."""
    losses: dict[int, list[float]] = {}
    vals: dict[int, list[float]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        for key, into in (("loss", losses), ("val_loss", vals)):
            if key in rec:
                into.setdefault(rec["step"], []).append(rec[key])
    return losses, vals


_refs: dict[tuple, tuple] = {}


def reference(data: str, tmp_path_factory, option: str) -> tuple[dict, dict]:
    """The uninterrupted single-process run with the same options (cached)."""
    key = (data, option)
    if key not in _refs:
        run = tmp_path_factory.mktemp("ref")
        world, overrides, env = config(data, run, "single", option)
        assert launch(world, overrides, env) is not None
        _refs[key] = logged(run)
    return _refs[key]


def assert_matches(run_dir: Path, ref: tuple[dict, dict], rtol: float = 1e-5) -> None:
    for got, want, what in zip(logged(run_dir), ref, ("loss", "validation loss")):
        assert sorted(got) == sorted(want), f"{what}: steps {sorted(got)} vs {sorted(want)}"
        for step, values in got.items():
            for v in values:  # a step logged twice (before the kill, after resume) both times
                assert abs(v - want[step][0]) <= rtol * abs(want[step][0]), (
                    f"step {step}: {what} {v!r} vs uninterrupted {want[step][0]!r}"
                )


def run_scenario(scenario: str, data: str, run: Path, layout: str, option: str) -> None:
    world, overrides, env = config(data, run, layout, option)
    if scenario == "uninterrupted":
        assert launch(world, overrides, env) is not None
    elif scenario == "kill":
        assert world > 1
        killed = launch(world, overrides, {**env, "TRIAXIS_FAULT_KILL": f"1:{KILL_STEP}"})
        assert killed is None, "rank 1 was to SIGKILL itself"
        assert mf.list_checkpoints(str(run / "checkpoints")), "no checkpoint before the kill"
        out = launch(world, overrides, env)
        assert out is not None and out[0]["final_step"] == int(overrides["train.steps"])
    elif scenario == "slices":
        done, steps = 0, int(overrides["train.steps"])
        while done < steps:  # 3 steps a launch: resumes at steps that are no save interval
            out = launch(world, {**overrides, "train.exit_after_steps": "3"}, env)
            assert out is not None and out[0]["final_step"] == min(done + 3, steps)
            done = out[0]["final_step"]
    else:
        raise AssertionError(scenario)
