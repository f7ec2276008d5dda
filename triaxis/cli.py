"""The `triaxis` command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import sys

from triaxis.errors import UserError


def _prepare(a: argparse.Namespace) -> int:
    from triaxis.data.prepare import PrepareOptions, prepare

    if a.vocab_size is not None and a.tokenizer != "bpe":
        # The byte and HF vocabularies are fixed; a silently ignored size would mislead.
        raise UserError(f"--vocab-size {a.vocab_size} applies to --tokenizer bpe only; "
                        f"{a.tokenizer} brings its own vocabulary: drop --vocab-size")
    vocab_size = PrepareOptions.vocab_size if a.vocab_size is None else a.vocab_size
    prepare(PrepareOptions(inputs=a.input or [], output=a.output, tokenizer=a.tokenizer,
                           vocab_size=vocab_size, eos_token=a.eos_token,
                           max_bytes=a.max_bytes, val_fraction=a.val_fraction,
                           shard_tokens=a.shard_tokens, workers=a.workers))
    return 0


def _split_config(rest: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.toml] [--section.field=value ...]"""
    if rest and not rest[0].startswith("--"):
        return rest[0], rest[1:]
    return None, rest


def _train(a: argparse.Namespace) -> int:
    from triaxis.config import load_config
    from triaxis.train.loop import run

    path, overrides = _split_config(a.rest)
    result = run(load_config(path, overrides))
    if result.preempted:
        # 128 + the signal (143 SIGTERM, 130 Ctrl-C): stopped on request, after a checkpoint
        return 128 + (result.stop_signal or 15)
    return 0 if result.final_step else 1


def _generate(a: argparse.Namespace) -> int:
    from triaxis.generate import generate, load_for_inference

    model, tok, ckpt = load_for_inference(a.checkpoint, a.device)
    ids = generate(model, tok.encode(a.prompt), a.max_new_tokens, a.temperature, a.top_k,
                   a.seed, eos_id=tok.eos_id)
    print(f"# sample from {ckpt}", file=sys.stderr)
    print(a.prompt + tok.decode(ids))
    return 0


def _layout(a: argparse.Namespace) -> int:
    from triaxis.parallel.layout_cli import print_layout

    print_layout(a)
    return 0


def _launch(a: argparse.Namespace) -> int:
    from triaxis.launch import launch

    return launch(a)


def _config(a: argparse.Namespace) -> int:
    from triaxis.config import SECTIONS, Config, field_docs, to_toml

    if a.fields:
        for section, cls in SECTIONS.items():
            print(f"[{section}]")
            defaults = getattr(Config(), section)
            for name, doc in field_docs(cls).items():
                print(f"  {name} = {getattr(defaults, name)!r}\n      {doc}")
        return 0
    print(to_toml(Config()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triaxis", description="Train LLMs with 3D parallelism.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="tokenize text into shards (default: embedded corpus)")
    pr.add_argument("--input", action="append",
                    help="file, folder or glob (repeatable); default: the Python stdlib sources")
    pr.add_argument("--output", default="data/stdlib", help="output folder")
    pr.add_argument("--tokenizer", default="bpe", metavar="{bpe,byte,hf:PATH}",
                    help="bpe: trained on the input (default); byte: UTF-8 bytes; hf:PATH: a "
                         "Hugging Face tokenizer.json or model folder (local or s3://), for "
                         "fine-tuning imported weights")
    pr.add_argument("--eos-token", default="", metavar="TEXT",
                    help="end-of-document token for hf:PATH (default: eos_token of its "
                         "tokenizer_config.json)")
    pr.add_argument("--vocab-size", type=int, default=None,
                    help="BPE vocabulary size (bpe only; default 8192)")
    pr.add_argument("--max-bytes", type=int, default=12_000_000,
                    help="read at most this many bytes of text (0 = all)")
    pr.add_argument("--val-fraction", type=float, default=0.02)
    pr.add_argument("--shard-tokens", type=int, default=16 * 2**20)
    pr.add_argument("--workers", type=int, default=0,
                    help="tokenizer processes (default 0 = min(cpu_count, 8)); same output")
    pr.set_defaults(fn=_prepare)

    tr = sub.add_parser("train", help="train: triaxis train [CONFIG.toml] [--section.field=v]")
    tr.set_defaults(fn=_train)

    ge = sub.add_parser("generate", help="sample text from a checkpoint")
    ge.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    ge.add_argument("--prompt", default="")
    ge.add_argument("--max-new-tokens", type=int, default=100)
    ge.add_argument("--temperature", type=float, default=0.8)
    ge.add_argument("--top-k", type=int, default=50)
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--device", default="cpu")
    ge.set_defaults(fn=_generate)

    la = sub.add_parser("layout", help="which rank holds which mesh coordinates")
    la.add_argument("--world", type=int, default=0, help="world size (default: from --nodes)")
    la.add_argument("--nodes", type=int, default=0)
    la.add_argument("--gpus-per-node", type=int, default=8)
    la.add_argument("--dp-replicate", "--dp", type=int, default=1)
    la.add_argument("--dp-shard", type=int, default=-1)
    la.add_argument("--tp", type=int, default=1)
    la.add_argument("--pp", type=int, default=1)
    la.add_argument("--layers", type=int, default=0, help="transformer blocks to place")
    la.add_argument("--svg", default="", help="also write the picture to this SVG file")
    la.set_defaults(fn=_layout)

    lc = sub.add_parser("launch", help="run training on N processes / nodes, or as a Slurm / "
                                       "SageMaker job")
    lc.add_argument("--nproc-per-node", type=int, default=0,
                    help="processes per node (default: GPUs, or 2 on CPU)")
    lc.add_argument("--nnodes", default="1",
                    help="nodes: N, or MIN:MAX for an elastic job (torchrun) that goes on with "
                         "at least MIN nodes when nodes are lost")
    lc.add_argument("--node-rank", type=int, default=0)
    lc.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the rendezvous (multi-node)")
    lc.add_argument("--max-restarts", type=int, default=0)
    lc.add_argument("--cpu", action="store_true", help="run on CPU (gloo) even if GPUs exist")
    from triaxis.launch import add_launch_args

    add_launch_args(lc)
    lc.set_defaults(fn=_launch)

    from triaxis.net.cli import add_net_parser

    add_net_parser(sub)

    from triaxis.plan.cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    from triaxis.checkpoint.cli import add_ckpt_parser

    add_ckpt_parser(sub)
    from triaxis.hf.cli import add_hf_parsers
    add_hf_parsers(sub)

    co = sub.add_parser("config", help="print the default config (or --fields: documented)")
    co.add_argument("--fields", action="store_true")
    co.set_defaults(fn=_config)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in ("train", "launch"):
        # Everything the subcommand does not know is CONFIG.toml and --section.field overrides.
        args, rest = parser.parse_known_args(argv)
        args.rest = rest
    else:
        args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
