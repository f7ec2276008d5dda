"""Slurm: one sbatch script that starts one triaxis launcher per node with srun.

The script (printed by --dry-run; else saved as RUN_DIR/sbatch.sh and submitted with sbatch)
asks for N nodes with one task each, finds the rendezvous host -- the first node of
SLURM_JOB_NODELIST (`scontrol show hostnames`), at the address Slurm itself reaches it by -- and
runs `triaxis launch --backend torchrun` on every node: torchrun's c10d rendezvous on that host,
P workers per node.

Requeue: with `#SBATCH --requeue` Slurm runs the script again from the top after `scontrol
requeue`, a node failure or a preemption, with SLURM_RESTART_COUNT incremented. Such a run forces
checkpoint.resume=auto, so it continues from the latest complete checkpoint in checkpoint.dir,
which is the same folder as before: the job's working directory is the submission directory.
Shortly before the time limit Slurm sends the batch shell USR1 (`--signal`), and the job
requeues itself rather than being killed: a long run proceeds as a chain of time-limited jobs.

Quoting: every value reaches the script quoted for the reader of its line. Body lines are bash
(`shlex.quote`). `#SBATCH` lines are read by sbatch itself, with rules of its own
(src/sbatch/opt.c, `get_argument`): words split at whitespace, `"..."` or `'...'` group a word,
a backslash escapes the next character, an unquoted `#` ends the line, and a line that
mentions "hetjob" or "packjob" anywhere starts a heterogeneous job component. So a directive
value is written bare when it is plain, else inside double quotes with backslash and `"`
escaped; a value naming hetjob/packjob, and any value holding a control character (a newline
would end the directive and start a shell line), is refused with one line.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from triaxis.errors import UserError

RDZV_PORT = 29400


def add_slurm_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="Slurm: GPUs to request per node (0 = CPU nodes)",
    )
    g.add_argument("--partition", default="", help="Slurm: partition (default: the cluster's)")
    g.add_argument("--account", default="", help="Slurm: account to charge")
    g.add_argument("--time", default="", help="Slurm: time limit per job, e.g. 24:00:00")
    g.add_argument("--job-name", default="triaxis", help="Slurm / SageMaker: job name")
    g.add_argument(
        "--requeue-margin-s",
        type=int,
        default=120,
        help="Slurm: requeue the job this many seconds before its time limit "
        "(0 = never); it resumes from its last checkpoint",
    )
    g.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        help="Slurm: another #SBATCH option, e.g. --sbatch-option=--exclusive",
    )
    g.add_argument(
        "--python",
        default=sys.executable,
        help="Slurm: the Python (with triaxis) on the compute nodes",
    )


@dataclass
class SlurmJob:
    nnodes: int
    nproc_per_node: int
    workdir: str
    """Absolute; the job runs there, so relative paths in the config mean what they mean here."""
    run_dir: str
    train_args: list[str]
    """[CONFIG.toml] --section.field=value ..., as given to `triaxis launch`."""
    python: str = sys.executable
    gpus_per_node: int = 0
    job_name: str = "triaxis"
    partition: str = ""
    account: str = ""
    time_limit: str = ""
    requeue_margin_s: int = 120
    rdzv_timeout_s: float = 600.0
    max_restarts: int = 0
    sbatch_options: list[str] = field(default_factory=list)


_DIRECTIVE_SPECIAL = set(" \t\"'\\#")
_HETJOB_WORDS = ("hetjob", "packjob")


def _check_text(what: str, value: str) -> None:
    from triaxis.fields import control_char

    ch = control_char(value)
    if ch is not None:
        raise UserError(
            f"{what}={value!r} holds the control character {ch!r}, which would "
            "break the sbatch script; remove it (rename the path)"
        )


def directive_word(what: str, value: str) -> str:
    """`value` as one word of an #SBATCH line, as sbatch's own parser reads it back."""
    _check_text(what, value)
    lower = value.lower()
    for word in _HETJOB_WORDS:
        if word in lower:
            raise UserError(
                f"{what}={value!r} contains {word!r}: sbatch reads any #SBATCH "
                "line with that word as the start of a heterogeneous job; rename "
                "it (e.g. the folder)"
            )
    if value and not _DIRECTIVE_SPECIAL.intersection(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _output_pattern(run_dir: str) -> str:
    """--output's file-name pattern: `%` is special there (`%j` = job id; `%%` = `%`), and a
    backslash anywhere turns every replacement off."""
    if "\\" in run_dir:
        raise UserError(
            f"train.run_dir={run_dir!r} holds a backslash, which turns off Slurm's "
            "%j in the log name (every job would share one log); rename the folder"
        )
    return str(Path(run_dir.replace("%", "%%"), "slurm-%j.out"))


def render_sbatch(job: SlurmJob) -> str:
    for what, value in (
        ("--python", job.python),
        ("workdir", job.workdir),
        ("train.run_dir", job.run_dir),
        *(("argument", a) for a in job.train_args),
    ):
        _check_text(what, value)
    opts = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nnodes}",
        "--ntasks-per-node=1",
        f"--chdir={job.workdir}",
        f"--output={_output_pattern(job.run_dir)}",
        "--open-mode=append",  # a requeued run appends to the same log
        "--requeue",
    ]
    if job.gpus_per_node:
        opts.append(f"--gpus-per-node={job.gpus_per_node}")
    for flag, value in (
        ("partition", job.partition),
        ("account", job.account),
        ("time", job.time_limit),
    ):
        if value:
            opts.append(f"--{flag}={value}")
    if job.requeue_margin_s > 0:
        opts.append(f"--signal=B:USR1@{job.requeue_margin_s}")
    opts += job.sbatch_options
    opts = [directive_word(o.partition("=")[0], o) for o in opts]
    launcher = [
        job.python,
        "-m",
        "triaxis",
        "launch",
        "--backend",
        "torchrun",
        "--nnodes",
        str(job.nnodes),
        "--nproc-per-node",
        str(job.nproc_per_node),
        "--rdzv-timeout",
        f"{job.rdzv_timeout_s:g}",
        "--max-restarts",
        str(job.max_restarts),
    ]
    cmd = (
        " ".join(shlex.quote(x) for x in launcher)
        + ' --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$SLURM_JOB_ID" \\\n    '
        + " ".join(shlex.quote(x) for x in job.train_args)
        + ' "${resume[@]}"'
    )
    lines = [
        "#!/bin/bash",
        f"# Written by `triaxis launch --backend slurm`: {job.nnodes} node(s) x "
        f"{job.nproc_per_node} process(es).",
        *[f"#SBATCH {o}" for o in opts],
        "set -uo pipefail",
        "",
        "# The first node of the allocation serves the rendezvous, at the address Slurm",
        "# reaches it by (NodeAddr; the node name when there is none).",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'head_addr=$(scontrol show node "$head_node" |',
        "    sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        f'rdzv_endpoint="${{head_addr:-$head_node}}:{RDZV_PORT}"',
        "",
        "# A requeued run (SLURM_RESTART_COUNT > 0) continues from the latest complete",
        "# checkpoint in checkpoint.dir, whatever checkpoint.resume says.",
        "resume=()",
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=(--checkpoint.resume=auto); fi',
        'echo "triaxis: job $SLURM_JOB_ID run ${SLURM_RESTART_COUNT:-0} on '
        '$SLURM_JOB_NODELIST, rendezvous $rdzv_endpoint"',
        "",
        "# USR1 comes --requeue-margin-s before the time limit: requeue instead of dying.",
        "# srun runs in the background so that the shell can take the signal meanwhile.",
        'trap \'echo "triaxis: time limit near, requeueing $SLURM_JOB_ID"; '
        'scontrol requeue "$SLURM_JOB_ID"\' USR1',
        f"srun --nodes={job.nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        f"    {cmd} &",
        "srun_pid=$!",
        'wait "$srun_pid"; status=$?',
        "# After the trap, wait returns early: wait again for srun's own status.",
        'if kill -0 "$srun_pid" 2>/dev/null; then wait "$srun_pid"; status=$?; fi',
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def _run(cmd: list[str], what: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise UserError(
            f"{cmd[0]} not found on PATH: {what} needs the Slurm client; run on a "
            "Slurm login node (or install it: apt-get install slurm-client), or add "
            "--dry-run to print the script"
        )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"`{' '.join(cmd)}` did not answer within 60 s; is slurmctld up? (check `sinfo`)"
        ) from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"`{' '.join(cmd)}` failed: {last}; check `sinfo` and the options")
    return proc.stdout


def submit(script: str, path: Path) -> str:
    """Save the script and submit it with sbatch; returns the job id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    return _run(["sbatch", "--parsable", str(path)], "--backend slurm").strip().split(";")[0]


def first_node_address(nodelist: str) -> str:
    """The address of the first node of a Slurm node list (as the sbatch script finds it)."""
    first = _run(["scontrol", "show", "hostnames", nodelist], "reading the node list").split()
    if not first:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r} names no node")
    node = _run(["scontrol", "show", "node", first[0]], "reading the node address")
    for word in node.split():
        if word.startswith("NodeAddr="):
            return word.split("=", 1)[1]
    return first[0]
