"""`triaxis plan`: choose the parallel layout of a model on a cluster, on paper.

    triaxis plan --model 70b --gpus 1024 --gpu h100 --cluster p5 --seq 4096 --global-batch 1024

`add_parser(subparsers)` registers the subcommand on triaxis's argparse tree; `main(argv)` runs
it standalone (tests, `python -m triaxis.plan.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from triaxis import storage
from triaxis.errors import UserError
from triaxis.plan.problem import AC_POLICIES, SCHEDULES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on the subparsers of the triaxis command line."""
    p = subparsers.add_parser(
        "plan",
        help="choose the parallel layout (dp, MiCS shard, tp, pp, schedule, micro-batch, "
        "checkpointing, offload) of a model on a cluster",
        description="Enumerate parallel layouts, drop those that do not fit, rank the rest by "
        "predicted step time or peak memory.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="preset (tiny, small, 1b, 8b, 70b, 405b) or a CONFIG.toml with a [model] section",
    )
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="default: the cluster profile's (8 for all shipped instance types)",
    )
    p.add_argument(
        "--gpu",
        default=None,
        help="a100-40g | a100-80g | h100 | h200 | ... (default: the cluster's)",
    )
    p.add_argument(
        "--cluster",
        default=None,
        help="p4d | p4de | p5 | p5e | p5en | dgx-a100 | dgx-h100 | ... (default: the GPU's)",
    )
    p.add_argument(
        "--hardware",
        default=None,
        metavar="FILE",
        help="TOML with [gpu.NAME] / [cluster.NAME] / [calibration] tables merged "
        "over the shipped profiles (e.g. your own measured bandwidths)",
    )
    p.add_argument("--seq", type=int, default=4096, help="tokens per sample (default 4096)")
    p.add_argument(
        "--global-batch", type=int, default=1024, help="samples per optimizer step (default 1024)"
    )
    p.add_argument("--vocab-size", type=int, default=None, help="override the model's vocabulary")
    p.add_argument(
        "--doc-tokens",
        type=int,
        default=0,
        help="document masking (data.mean_document_tokens): attention counts min(seq, this) "
        "keys per query (default 0: the whole sample)",
    )
    p.add_argument(
        "--float8",
        default="off",
        choices=["off", "tensorwise", "rowwise", "auto"],
        help="train.float8 of the run: price the converted projections at the GPU's FP8 rate "
        "(auto: plan each recipe, keep the fastest and say why; refused on GPUs without FP8)",
    )
    p.add_argument("--objective", default="speed", choices=["speed", "memory"])
    p.add_argument("--top", type=int, default=5, help="layouts to print (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--write", default=None, metavar="PATH", help="also write the winner's TOML snippet to PATH"
    )
    p.add_argument(
        "--no-pipeline",
        action="store_true",
        help="pp = 1 only",
    )
    p.add_argument("--no-offload", action="store_true", help="never offload states to the host")
    p.add_argument("--max-tp", type=int, default=0, help="largest tp (default: GPUs per node)")
    p.add_argument(
        "--max-cp", type=int, default=0, help="largest cp (default: GPUs per node; 1 = no cp)"
    )
    p.add_argument("--max-pp", type=int, default=0, help="largest pp (default: blocks)")
    p.add_argument(
        "--ac",
        default=",".join(AC_POLICIES),
        help=f"checkpointing policies to try, comma-separated ({','.join(AC_POLICIES)})",
    )
    p.add_argument(
        "--schedules",
        default=",".join(SCHEDULES),
        help=f"pipeline schedules to try ({','.join(SCHEDULES)})",
    )
    p.add_argument(
        "--memory-keep",
        type=int,
        default=0,
        help="also size the in-memory checkpoint tier holding this many steps "
        "(checkpoint.memory_keep; 0 = off): its host memory per node for the #1 layout",
    )
    p.set_defaults(fn=run)
    return p


def memory_tier_line(plan, gpus: int, gpus_per_node: int, keep: int) -> tuple[str, float]:
    """The memory tier's host memory per node for `plan` (checkpoint.memory_keep = keep): each
    GPU's parameters and AdamW state x the node's GPUs x (keep + 1), twice with a buddy
    replica (2 or more nodes)."""
    from triaxis.checkpoint.memory_tier import footprint_bytes

    m, local = plan.memory, min(gpus, gpus_per_node)
    offloaded = m.host_per_node / local if plan.layout.cpu_offload else 0.0
    per_gpu = m.params + m.optim + offloaded
    copies = 2 if gpus > gpus_per_node else 1
    need = footprint_bytes(int(per_gpu), local, keep) * copies
    buddy = " x 2 (the buddy replica of the previous node)" if copies == 2 else ""
    return (
        f"memory tier (checkpoint.memory_keep={keep}): {need / 2**30:.1f} GiB of host memory per "
        f"node ({per_gpu / 2**30:.2f} GiB of state per GPU x {local} GPUs x {keep + 1} steps"
        f"{buddy})",
        need,
    )


def _choices(raw: str, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
    picked = tuple(x.strip() for x in raw.split(",") if x.strip())
    bad = [x for x in picked if x not in known]
    if bad or not picked:
        raise UserError(
            f"{flag} {raw!r}: {bad or 'empty'} not among {list(known)}; pass a "
            f"comma-separated subset, e.g. {flag} {','.join(known)}"
        )
    return picked


def run(a: argparse.Namespace) -> int:
    """The `plan` subcommand; returns the exit code (0 = a plan, 2 = nothing fits)."""
    from triaxis.plan.float8_choice import plan_float8
    from triaxis.plan.hardware import load_catalog, resolve_hardware
    from triaxis.plan.problem import Problem, load_model
    from triaxis.plan.report import explain, header, no_fit_message, tables, to_json, toml_snippet
    from triaxis.plan.runtimes import RUNTIMES
    from triaxis.plan.search import SearchSpace

    if a.write:
        storage.check_output_path(a.write, "--write")
    for flag, value in (
        ("--gpus", a.gpus),
        ("--seq", a.seq),
        ("--global-batch", a.global_batch),
        ("--top", a.top),
    ):
        if value < 1:
            raise UserError(f"{flag}={value} must be >= 1")
    if a.memory_keep < 0:
        raise UserError(f"--memory-keep={a.memory_keep} must be >= 0 (0 = no memory tier)")
    if a.doc_tokens < 0:
        raise UserError(f"--doc-tokens={a.doc_tokens} must be >= 0 (0 = the whole sample)")
    catalog = load_catalog(a.hardware)
    hw = resolve_hardware(catalog, a.gpu, a.cluster, a.gpus_per_node)
    shape, args = load_model(a.model, a.vocab_size)
    if a.seq > args.max_seq_len:
        raise UserError(
            f"--seq {a.seq} is over the model's max_seq_len={args.max_seq_len} "
            f"(training would refuse it); pass --seq <= {args.max_seq_len} or a "
            "CONFIG.toml with a larger model.max_seq_len"
        )
    space = SearchSpace(
        schedules=_choices(a.schedules, SCHEDULES, "--schedules"),
        ac_policies=_choices(a.ac, AC_POLICIES, "--ac"),
        allow_offload=not a.no_offload and hw.gpu.bf16,
        max_pp=1 if a.no_pipeline else a.max_pp,
        max_tp=a.max_tp,
        max_cp=a.max_cp,
    )
    problem = Problem(shape, hw, RUNTIMES["triaxis"], a.seq, a.global_batch, a.doc_tokens)
    # Keep a runner-up even for --top 1: the explanation compares the winner with it.
    result, float8_note = plan_float8(
        problem, a.gpus, a.objective, space, max(a.top, 2), catalog, a.float8
    )
    tier = None
    if a.memory_keep and result.plans:
        tier = memory_tier_line(result.plans[0], a.gpus, hw.gpus_per_node, a.memory_keep)
    if a.json:
        extra = {"memory_tier_host_bytes_per_node": tier[1]} if tier else {}
        print(
            json.dumps({**to_json(result, a.top), "float8_choice": float8_note, **extra}, indent=1)
        )
    elif result.plans:
        print(header(result))
        print(tables(result, a.top))
        print("\nWhy #1: " + explain(result))
        if float8_note:
            print("FP8: " + float8_note)
        if tier:
            print(tier[0][0].upper() + tier[0][1:])
        print("\n" + toml_snippet(result))
    if not result.plans:
        print("error: " + no_fit_message(result), file=sys.stderr)
        return 2
    if a.write:
        Path(a.write).write_text(toml_snippet(result))
        if not a.json:
            print(f"wrote {a.write}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m triaxis.plan.cli --model 8b --gpus 64 --gpu h100`."""
    parser = argparse.ArgumentParser(prog="triaxis")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(["plan", *argv] if not argv or argv[0] != "plan" else argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
