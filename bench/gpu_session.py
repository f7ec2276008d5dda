"""The one prepared GPU session (issue 23): its parts in order of value under one deadline.

    python bench/gpu_session.py               # what bench/gpu_session.sh runs (DEV=cuda)
    DEV=cpu python bench/gpu_session.py       # the CPU dry run: tiny shapes, short deadline

Each part is a child process in its own process group, given min(its cap, time left) and then
SIGKILLed with its group (never SIGTERM: `triaxis train` answers SIGTERM with a preemption
checkpoint, 15 GB at 1b). Its output streams to $OUT/log.txt and stdout as it comes. The moment
a part ends, one JSON row lands in $OUT/rows.jsonl: its figures, or an error row with the tail
of its output. The summary, built from rows.jsonl (error rows included), is printed last.

Throughput protocol, the same on both sides: W warm-up steps, then T timed steps; tokens/s =
T * batch * seq / (wall time of the T steps); peak memory reset after warm-up. triaxis: the
metrics records every gcd(W, T) steps (windows that tile the timed steps exactly) and
metrics.reset_peak_memory_after=W; the peer baseline does the same in its own loop. MFU: triaxis's
FLOPs-per-token formula and hardware.toml's peak for every row (the peer's own MFU is kept as
`mfu_peer`: the same convention, a cross-check).

Environment: OUT (default /tmp/triaxis-gpu), DEV (cuda | cpu), TRIAXIS_GPU_DEADLINE_S (450 on
cuda, 300 on cpu), TRIAXIS_GPU_PARTS (comma list: run only these, e.g. for a rerun),
TRIAXIS_GPU_CAPS ("part=seconds,...": override caps), TRIAXIS_GPU_FAIL (a part name: replace it
by a failing command, to prove the error path), TRIAXIS_GPU_PEER (the baseline's path, default
.peer/hf_llama_baseline.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_summary import summary_text  # noqa: E402 - the bench folder is not a package


@dataclass
class Shape:
    """What the session runs at: the 1b preset on a GPU, tiny on the CPU dry run."""

    device: str
    preset: str
    batch: int
    seq: int
    warmup: int
    timed: int
    compile_backend: str
    peer_layers: int
    deadline_s: float

    @classmethod
    def of(cls, device: str) -> Shape:
        deadline = float(os.environ.get("TRIAXIS_GPU_DEADLINE_S", 450 if device == "cuda" else 300))
        if device == "cuda":
            return cls("cuda", "1b", 8, 2048, 5, 15, "inductor", 16, deadline)
        # aot_eager: the compiled path's graph capture without the C++ compile of inductor.
        return cls("cpu", "tiny", 4, 64, 2, 4, "aot_eager", 1, deadline)


@dataclass
class Part:
    name: str
    cap_s: float
    argv: list[str]
    kind: str = "other"
    """triaxis (a `triaxis train` run: the row comes from its metrics.jsonl), smoke (one too,
    only its last loss), peer (the baseline's JSON line), other (its own `ROW {...}` line)."""
    env: dict = field(default_factory=dict)
    opt_in: bool = False
    """Runs only when TRIAXIS_GPU_PARTS names it (the float8 rows: a session of their own)."""

    def run_dir(self) -> str:
        """A `triaxis train` part's run folder ("" for the others)."""
        flag = "--train.run_dir="
        return next((a.removeprefix(flag) for a in self.argv if a.startswith(flag)), "")


def triaxis_argv(s: Shape, run_dir: Path, compile_: bool, *extra: str) -> list[str]:
    log_every = math.gcd(s.warmup, s.timed)
    return [
        sys.executable, "-m", "triaxis", "train",
        f"--model.preset={s.preset}", "--data.path=synthetic", f"--data.seq_len={s.seq}",
        f"--train.run_dir={run_dir}", f"--train.steps={s.warmup + s.timed}",
        f"--train.global_batch={s.batch}", f"--train.micro_batch={s.batch}",
        f"--train.device={s.device}", f"--train.compile={str(compile_).lower()}",
        f"--train.compile_backend={s.compile_backend}", "--train.val_every=0",
        "--train.warmup_steps=2", "--checkpoint.interval=0", "--checkpoint.save_final=false",
        f"--metrics.log_every={log_every}", f"--metrics.reset_peak_memory_after={s.warmup}",
        "--train.on_bad_loss=off",  # not even the guard's device-side check
        "--metrics.progress=false", "--metrics.tensorboard=false",
        *extra,
    ]  # fmt: skip


def parts(s: Shape, scratch: Path, out: Path) -> list[Part]:
    py = sys.executable
    peer = os.environ.get("TRIAXIS_GPU_PEER", str(ROOT / ".peer/hf_llama_baseline.py"))
    peer_argv = [py, peer, "--batch", str(s.batch), "--seq", str(s.seq), "--layers",
                 str(s.peer_layers), "--warmup", str(s.warmup),
                 "--steps", str(s.timed)]  # fmt: skip
    smoke = [*triaxis_argv(s, scratch / "smoke", False), "--model.preset=tiny", "--data.seq_len=64"]
    smoke += ["--train.steps=4", "--metrics.log_every=2", "--metrics.reset_peak_memory_after=0"]
    # FSDP at dp_shard=1 with the plain row's numerics: fp32 parameters, bf16 autocast compute.
    fsdp = ["--parallel.fsdp_always=true", "--parallel.fsdp_autocast=true"]
    parts_dir = str(ROOT / "bench/gpu_parts.py")
    plan_argv = [py, parts_dir, "plan-check", "--rows", str(out / "rows.jsonl"), "--preset",
                 s.preset, "--seq", str(s.seq), "--micro-batch", str(s.batch)]  # fmt: skip
    sync_test = "tests/test_host_sync.py::test_no_cuda_sync_between_log_steps_on_a_gpu"
    site = ROOT / ".peer/site"  # pytest, carried in when the machine has none (see the .sh)
    pytest_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(site)]))}
    return [
        Part("smoke", 90, smoke, "smoke"),
        Part("triaxis-compiled", 150, triaxis_argv(s, scratch / "tc", True), "triaxis"),
        Part("hf-compiled", 150, [*peer_argv, "--compile"], "peer"),
        Part("triaxis-eager", 90, triaxis_argv(s, scratch / "te", False), "triaxis"),
        Part("hf-eager", 90, peer_argv, "peer"),
        Part("plan-check", 40, plan_argv),
        Part("flex-vs-dense", 90, [py, parts_dir, "flex", "--device", s.device]),
        Part("cp-kernels", 90, [py, parts_dir, "cp", "--device", s.device]),
        Part("triaxis-fsdp", 150, triaxis_argv(s, scratch / "tf", True, *fsdp), "triaxis"),
        *float8_parts(s, scratch),
        Part(
            "host-sync",
            90,
            [py, "-m", "pytest", "-x", "-vv", "-p", "no:cacheprovider", "-rs", sync_test],
            env=pytest_env,
        ),  # fmt: skip
    ]


FLOAT8_PARTS = [f"f8-{w}-{r}" for w in ("1b", "8bw") for r in ("bf16", "tensorwise", "rowwise")]
"""Issue 29: bf16 compiled against float8 compiled, at 1b and at 8b width (4 layers); target
>= 1.2x bf16 tokens/s at 8b width, loss within 1% over the timed steps. Opt-in (the torchao
wheel must be carried, see the .sh): TRIAXIS_GPU_PARTS=<these, comma-joined>."""


def float8_parts(s: Shape, scratch: Path) -> list[Part]:
    out = []
    for name in FLOAT8_PARTS:
        _, width, recipe = name.split("-")
        shape = [] if width == "1b" else ["--model.preset=8b", "--model.n_layers=4"]
        if s.device == "cpu":  # the dry run: tiny, every linear converted
            shape = ["--model.preset=tiny", "--train.float8_min_dim=16", "--train.dtype=bf16"]
        f8 = [] if recipe == "bf16" else [f"--train.float8={recipe}"]
        argv = triaxis_argv(s, scratch / name, True, *shape, *f8)
        out.append(Part(name, 150, argv, "triaxis", opt_in=True))
    return out


class Session:
    def __init__(self, out: Path, deadline_s: float):
        self.out = out
        self.end = time.monotonic() + deadline_s
        self.log = open(out / "log.txt", "a", buffering=1)  # noqa: SIM115 - held all session
        self.rows = out / "rows.jsonl"

    def say(self, text: str) -> None:
        self.log.write(text + "\n")
        print(text, flush=True)

    def row(self, row: dict) -> None:
        with open(self.rows, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.say("ROW " + json.dumps(row))

    def run(self, part: Part) -> tuple[int | None, list[str], float]:
        """Run `part` to its end or its time; returns (returncode, output tail, seconds). The
        returncode is -9 when it was killed, None when no time was left to start it."""
        left = self.end - time.monotonic()
        limit = min(part.cap_s, left)
        if limit < 5:
            return None, [f"not started: {left:.0f}s left of the session's deadline"], 0.0
        self.say(f"== {part.name} (limit {limit:.0f}s, {time.strftime('%H:%M:%S')})")
        env = {**os.environ, "TRIAXIS_DEBUG": "1", "PYTHONUNBUFFERED": "1", **part.env}
        t0 = time.monotonic()
        child = subprocess.Popen(
            part.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            start_new_session=True, text=True, errors="replace",
        )  # fmt: skip
        tail: deque[str] = deque(maxlen=40)

        def pump() -> None:
            for line in child.stdout:
                tail.append(line.rstrip("\n"))
                self.log.write(line)
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            # The whole group: a compile worker or a grandchild must not outlive its part.
            os.killpg(child.pid, signal.SIGKILL)
            rc = child.wait()
            tail.append(f"killed (SIGKILL) after {time.monotonic() - t0:.0f}s (limit {limit:.0f}s)")
        reader.join(timeout=10)  # a stray that left the group may hold the pipe: stop waiting
        return rc, list(tail), time.monotonic() - t0


def triaxis_row(run_dir: Path, s: Shape, smoke: bool = False) -> dict:
    """tokens/s over exactly the timed steps: the records' windows after the warm-up."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tokens_per_s" in r]
    if smoke:  # it ran and learned something; its speed means nothing
        return {"loss_first": recs[0]["loss"], "loss": recs[-1]["loss"]}
    warmup, timed = s.warmup, s.timed
    steps = [r["step"] for r in recs]
    if warmup not in steps or warmup + timed not in steps:
        raise ValueError(f"no record at step {warmup} and {warmup + timed}: records at {steps}")
    timed_recs = [r for r in recs if warmup < r["step"] <= warmup + timed]
    tokens_per_step = s.batch * s.seq
    seconds, prev = 0.0, warmup
    for r in timed_recs:  # each record's tokens/s is over the steps since the previous record
        seconds += (r["step"] - prev) * tokens_per_step / r["tokens_per_s"]
        prev = r["step"]
    tokens_per_s = timed * tokens_per_step / seconds
    last = timed_recs[-1]
    # The record's own MFU is its window's tokens/s x FLOPs per token / peak: the same ratio.
    mfu = last["mfu"] * tokens_per_s / last["tokens_per_s"] if last.get("mfu") else None
    return {
        "tokens_per_s": tokens_per_s,
        "step_s": seconds / timed,
        "mfu": mfu,
        "peak_mem_gib": last["max_memory_gib"],  # the peak since the reset after warm-up
        "loss": last["loss"],
    }


def peer_row(tail: list[str], s: Shape) -> dict:
    line = next((x for x in reversed(tail) if x.startswith("{")), None)
    if line is None:
        raise ValueError("the baseline printed no JSON line")
    got = json.loads(line)
    row = {k: got.get(k) for k in ("tokens_per_s", "step_s", "peak_mem_gib", "loss", "gpu")}
    row.update(mfu_peer=got.get("mfu"), matmul_tflops=got.get("matmul_tflops"))
    row["mfu"] = same_mfu(s, got["tokens_per_s"], got.get("gpu", ""))
    return row


def same_mfu(s: Shape, tokens_per_s: float, gpu: str) -> float | None:
    """MFU by triaxis's formula and hardware.toml's peak: the one convention for every row."""
    from triaxis.hardware import peak_bf16_flops
    from triaxis.model.args import flops_per_token
    from triaxis.model.presets import PRESETS

    peak = peak_bf16_flops(gpu)
    return tokens_per_s * flops_per_token(PRESETS[s.preset], s.seq) / peak if peak else None


VERDICTS = (" PASSED", " FAILED", " SKIPPED", " ERROR", " XFAIL", " XPASS")


def other_row(tail: list[str]) -> dict:
    got = [json.loads(x[4:]) for x in tail if x.startswith("ROW ")]
    if got:
        return got[-1]
    # pytest -v: one verdict line per test; a skip (no CUDA) is not a pass.
    verdicts = [x for x in tail if "::" in x and any(w in x for w in VERDICTS)]
    if not verdicts or not all(" PASSED" in x for x in verdicts):
        raise ValueError(f"pytest: {'; '.join(verdicts) or 'no verdict line'}")
    return {"result": "; ".join(verdicts)}


def main() -> int:
    device = os.environ.get("DEV", "cuda")
    s = Shape.of(device)
    out = Path(os.environ.get("OUT", "/tmp/triaxis-gpu"))
    out.mkdir(parents=True, exist_ok=True)
    # Run folders outside $OUT: whatever lands there comes back over the wire.
    scratch = Path(os.environ.get("TRIAXIS_GPU_SCRATCH", "/tmp/triaxis-gpu-runs"))
    scratch.mkdir(parents=True, exist_ok=True)
    session = Session(out, s.deadline_s)
    session.say(f"gpu_session: {s}")
    chosen = set(filter(None, os.environ.get("TRIAXIS_GPU_PARTS", "").split(",")))
    caps_env = os.environ.get("TRIAXIS_GPU_CAPS", "")
    caps = dict(x.split("=") for x in filter(None, caps_env.split(",")))
    fail = os.environ.get("TRIAXIS_GPU_FAIL", "")
    for part in parts(s, scratch, out):
        if (chosen or part.opt_in) and part.name not in chosen:
            continue
        part.cap_s = float(caps.get(part.name, part.cap_s))
        if part.name == fail:
            part.argv = [sys.executable, "-c", f"raise SystemExit('injected failure: {fail}')"]
        run_dir = part.run_dir()
        if run_dir:  # a rerun on a warm machine starts afresh, not from the last run's metrics
            shutil.rmtree(run_dir, ignore_errors=True)
        rc, tail, seconds = session.run(part)
        row = {"part": part.name, "device": device, "wall_s": round(seconds, 1), "rc": rc}
        try:
            if rc != 0:
                raise RuntimeError("killed (SIGKILL)" if rc == -9 else f"exit {rc}")
            if part.kind in ("triaxis", "smoke"):
                row.update(triaxis_row(Path(run_dir), s, part.kind == "smoke"))
            elif part.kind == "peer":
                row.update(peer_row(tail, s))
            else:
                row.update(other_row(tail))
            row["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure becomes the part's error row
            row.update(ok=False, error=f"{type(e).__name__}: {e}", tail=tail[-25:])
        session.row(row)
    text = summary_text([json.loads(x) for x in session.rows.read_text().splitlines()])
    (out / "summary.txt").write_text(text + "\n")
    session.say(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
