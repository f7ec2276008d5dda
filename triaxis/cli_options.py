"""The command-line options' value rules, in one place: each option of each subcommand against
its Range (a config field's rule lives in its own definition, config/sections.py; prepare's in
PrepareOptions), checked before the command touches anything."""

from __future__ import annotations

import argparse


def option_rules() -> dict[str, dict[str, object]]:
    """Command -> option (argparse dest) -> its Range: the command-line options' rules in one
    place (a config field's rule lives in its own definition, config/sections.py; prepare's in
    PrepareOptions). Every option also gets the generic rules of fields.check_value."""
    from triaxis.fields import Range

    return {
        "generate": {
            "max_new_tokens": Range(ge=1, le=2**20),
            "temperature": Range(ge=0, le=100),
            "top_k": Range(ge=0),
            "seed": Range(ge=0),
        },
        "launch": {
            "nproc_per_node": Range(ge=0, le=4096),
            "node_rank": Range(ge=0),
            "max_restarts": Range(ge=0, le=10_000),
            "rdzv_timeout": Range(gt=0),
            "rdzv_last_call": Range(ge=0),
            "gpus_per_node": Range(ge=0, le=1024),
            "requeue_margin_s": Range(ge=0),
        },
        "layout": {
            "world": Range(ge=0),
            "nodes": Range(ge=0),
            "gpus_per_node": Range(ge=1),
            "dp_replicate": Range(ge=1),
            "dp_shard": Range(ge=-1),
            "tp": Range(ge=1),
            "pp": Range(ge=1),
            "layers": Range(ge=0),
        },
        "plan": {
            "gpus": Range(ge=1),
            "gpus_per_node": Range(ge=1),
            "seq": Range(ge=1),
            "global_batch": Range(ge=1),
            "vocab_size": Range(ge=1),
            "top": Range(ge=1),
            "max_tp": Range(ge=0),
            "max_pp": Range(ge=0),
        },
        "net": {
            "nproc_per_node": Range(ge=0, le=4096),
            "nnodes": Range(ge=1),
            "rdzv_timeout": Range(gt=0),
        },
        "export-hf": {"max_shard_gb": Range(gt=0)},
        "ckpt": {"step": Range(ge=0)},
    }


_FREE_TEXT = {"prompt", "eos_token"}
"""Options whose text may hold control characters (a prompt with newlines)."""


def check_options(a: argparse.Namespace) -> None:
    """Every parsed option against its rule, before the command touches anything."""
    from triaxis.fields import check_value

    rules = option_rules().get(a.command, {})
    for name, value in vars(a).items():
        if name in ("fn", "rest", "command") or name in _FREE_TEXT or callable(value):
            continue
        where = "--" + name.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            check_value(where, item, rules.get(name))  # type: ignore[arg-type]
