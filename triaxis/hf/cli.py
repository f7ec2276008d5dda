"""`triaxis import-hf` and `triaxis export-hf`, registered by `add_hf_parsers(subparsers)`."""

from __future__ import annotations

import argparse


def _import(a: argparse.Namespace) -> int:
    from triaxis import storage
    from triaxis.hf.convert import model_overrides
    from triaxis.hf.importer import import_hf

    storage.check_output_path(a.output, "--output", folder=True)
    args = import_hf(a.dir, a.output, force=a.force)
    print(
        "fine-tune from it with the same model shape:\n  triaxis train CONFIG.toml "
        f"--checkpoint.initial={a.output} " + " ".join(model_overrides(args))
    )
    return 0


def _export(a: argparse.Namespace) -> int:
    from triaxis import storage
    from triaxis.hf.exporter import export_hf

    storage.check_output_path(a.dir, "DIR", folder=True)
    if a.lora or a.merge:
        from triaxis.hf.lora_export import export_lora

        export_lora(a.checkpoint, a.dir, a.merge, max_shard_gb=a.max_shard_gb, force=a.force)
        return 0
    export_hf(a.checkpoint, a.dir, max_shard_gb=a.max_shard_gb, force=a.force, dtype=a.dtype)
    return 0


def add_hf_parsers(subparsers) -> None:
    im = subparsers.add_parser(
        "import-hf",
        help="Hugging Face Llama folder (safetensors) -> triaxis checkpoint",
        description="Convert a Llama-architecture Hugging Face model folder (config.json + "
        "model.safetensors or sharded safetensors with an index) into a triaxis "
        "checkpoint that loads under any parallel layout; fine-tune from it with "
        "--checkpoint.initial=OUTPUT.",
    )
    im.add_argument("dir", metavar="DIR", help="Hugging Face model folder")
    im.add_argument("--output", required=True, metavar="OUT", help="checkpoint folder to write")
    im.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    im.set_defaults(fn=_import)

    ex = subparsers.add_parser(
        "export-hf",
        help="triaxis checkpoint -> Hugging Face Llama folder (safetensors)",
        description="Write a checkpoint (a run folder's latest, a checkpoints folder's latest, "
        "or one step_XXXXXXXX folder; saved under any layout) as a Hugging Face "
        "LlamaForCausalLM folder: config.json + fp32 or bf16 safetensors (streamed one "
        "tensor at a time), the tokenizer files and generation_config.json.",
    )
    ex.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="run folder, checkpoints folder or step_XXXXXXXX folder",
    )
    ex.add_argument("dir", metavar="DIR", help="output folder")
    ex.add_argument(
        "--max-shard-gb",
        type=float,
        default=5.0,
        help="split the weights into shards of at most this many GB (default 5)",
    )
    ex.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="dtype of the written weights (default fp32)",
    )
    ex.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty DIR (its old config/safetensors are replaced)",
    )
    which = ex.add_mutually_exclusive_group()
    which.add_argument(
        "--lora",
        action="store_true",
        help="a LoRA run: write PEFT's adapter_model.safetensors + adapter_config.json",
    )
    which.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run: write the model with the adapters merged into its weights",
    )
    ex.set_defaults(fn=_export)
