"""Resuming across LoRA and full training: refused in one line, with the way that works."""

from __future__ import annotations

import tomllib


def _lora_on(config_toml: str) -> bool:
    try:
        section = tomllib.loads(config_toml or "").get("lora") or {}
    except tomllib.TOMLDecodeError:
        return False
    return bool(section.get("enabled"))


def check_lora_resume(path: str, saved_config: str, run_config: str) -> str | None:
    """The one-line refusal when the checkpoint's run and this run disagree on lora.enabled
    (resuming, not checkpoint.initial: a base is named through checkpoint.initial)."""
    was, now = _lora_on(saved_config), _lora_on(run_config)
    if was == now:
        return None
    if now:
        return (
            f"checkpoint {path} is from a full (non-LoRA) run and this run has "
            "lora.enabled=true; to fine-tune adapters on its weights, name it as the base: "
            f"--checkpoint.initial={path} with a fresh --checkpoint.dir (or set "
            "--lora.enabled=false to resume it)"
        )
    return (
        f"checkpoint {path} is from a LoRA run and this run has lora.enabled=false; resume "
        "it with --lora.enabled=true and its [lora] settings, or train the merged model: "
        "triaxis export-hf --merge, import-hf, then --checkpoint.initial"
    )
