"""The `triaxis` command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from triaxis.cli_options import check_options
from triaxis.errors import UserError

DEBUG_ENV = "TRIAXIS_DEBUG"
BUG_EXIT = 1
"""Exit status of an unexpected exception (a bug); bad input exits 2 (UserError)."""


def _prepare(a: argparse.Namespace) -> int:
    from triaxis import storage
    from triaxis.data.prepare import PrepareOptions, prepare

    storage.check_output_path(a.output, "--output", folder=True)

    if a.vocab_size is not None and a.tokenizer != "bpe":
        # The byte and HF vocabularies are fixed; a silently ignored size would mislead.
        raise UserError(
            f"--vocab-size {a.vocab_size} applies to --tokenizer bpe only; "
            f"{a.tokenizer} brings its own vocabulary: drop --vocab-size"
        )
    vocab_size = PrepareOptions.vocab_size if a.vocab_size is None else a.vocab_size
    prepare(
        PrepareOptions(
            inputs=a.input or [],
            output=a.output,
            tokenizer=a.tokenizer,
            vocab_size=vocab_size,
            eos_token=a.eos_token,
            max_bytes=a.max_bytes,
            val_fraction=a.val_fraction,
            shard_tokens=a.shard_tokens,
            workers=a.workers,
            format=a.format,
            pack_seq_len=a.pack_seq_len,
            overlong=a.overlong,
        )
    )
    return 0


def _train(a: argparse.Namespace) -> int:
    from triaxis.config import load_config, split_config_args
    from triaxis.hf.run_output import HfOutput
    from triaxis.plan.auto import auto_layout
    from triaxis.train.run import run

    path, overrides = split_config_args(a.rest)
    result = run(load_config(path, overrides), planner=auto_layout, hf_output=HfOutput)
    if result.preempted:
        # 128 + the signal (143 SIGTERM, 130 Ctrl-C): stopped on request, after a checkpoint
        return 128 + (result.stop_signal or 15)
    return 0 if result.final_step else 1


def _generate(a: argparse.Namespace) -> int:
    from triaxis.checkpoint.inference import load_for_inference
    from triaxis.generate import generate
    from triaxis.hardware import check_torch_device

    check_torch_device("--device", a.device)
    model, tok, ckpt = load_for_inference(a.checkpoint, a.device, a.data)
    ids = generate(
        model,
        tok.encode(a.prompt),
        a.max_new_tokens,
        a.temperature,
        a.top_k,
        a.seed,
        eos_id=tok.eos_id,
    )
    print(f"# sample from {ckpt}", file=sys.stderr)
    print(a.prompt + tok.decode(ids))
    return 0


def _layout(a: argparse.Namespace) -> int:
    from triaxis import storage
    from triaxis.parallel.layout_cli import print_layout

    if a.svg:
        storage.check_output_path(a.svg, "--svg")
    print_layout(a)
    return 0


def _launch(a: argparse.Namespace) -> int:
    from triaxis.launch import launch

    return launch(a)


def _config(a: argparse.Namespace) -> int:
    from triaxis.config import Config, to_toml
    from triaxis.config_doc import fields_markdown, fields_text

    if a.markdown:
        print(fields_markdown(), end="")
    elif a.fields:
        print(fields_text())
    else:
        print(to_toml(Config()))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one `error:` line and exit 2 (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(UserError.exit_code)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="triaxis",
        description="Train LLMs with 3D parallelism.",
        epilog=f"--debug (or {DEBUG_ENV}=1) shows the traceback of an unexpected error.",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an unexpected error, show the full traceback (also " + DEBUG_ENV + "=1)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="tokenize text into shards (default: embedded corpus)")
    pr.add_argument(
        "--input",
        action="append",
        help="file, folder or glob (repeatable); default: the Python stdlib sources",
    )
    pr.add_argument("--output", default="data/stdlib", help="output folder")
    pr.add_argument(
        "--tokenizer",
        default="bpe",
        metavar="{bpe,byte,hf:PATH}",
        help="bpe: trained on the input (default); byte: UTF-8 bytes; hf:PATH: a "
        "Hugging Face tokenizer.json or model folder (local or s3://), for "
        "fine-tuning imported weights",
    )
    pr.add_argument(
        "--eos-token",
        default="",
        metavar="TEXT",
        help="end-of-document token for hf:PATH (default: eos_token of its tokenizer_config.json)",
    )
    pr.add_argument(
        "--vocab-size", type=int, default=None, help="BPE vocabulary size (bpe only; default 8192)"
    )
    pr.add_argument(
        "--max-bytes",
        type=int,
        default=0,
        help="tokenize only the first documents up to this many characters (0 = all; "
        "the BPE tokenizer trains on at most 12,000,000)",
    )
    pr.add_argument("--val-fraction", type=float, default=0.02)
    pr.add_argument("--shard-tokens", type=int, default=16 * 2**20)
    pr.add_argument(
        "--workers",
        type=int,
        default=0,
        help="tokenizer processes (default 0 = min(cpu_count, 8)); same output",
    )
    pr.add_argument(
        "--format",
        default="text",
        metavar="{text,chat,prompt-completion}",
        help="text: documents (default); chat: JSON Lines of {messages: [{role, content}]}, "
        "rendered by the hf:PATH chat template; prompt-completion: {prompt, completion} "
        "lines. The last two write a loss mask: only assistant / completion tokens count",
    )
    pr.add_argument(
        "--pack-seq-len",
        type=int,
        default=0,
        metavar="N",
        help="pack whole examples (documents, for text) into windows for data.seq_len=N, "
        "padded with masked tokens, never split (default 0: the concatenated stream)",
    )
    pr.add_argument(
        "--overlong",
        default="truncate",
        metavar="{truncate,drop,error}",
        help="with --pack-seq-len: what to do with an example longer than a window",
    )
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
    ge.add_argument(
        "--data",
        default="",
        metavar="PATH",
        help="prepared data folder whose tokenizer to use (default: the one the run recorded)",
    )
    ge.set_defaults(fn=_generate)

    la = sub.add_parser("layout", help="which rank holds which mesh coordinates")
    la.add_argument("--world", type=int, default=0, help="world size (default: from --nodes)")
    la.add_argument("--nodes", type=int, default=0)
    la.add_argument("--gpus-per-node", type=int, default=8)
    la.add_argument("--dp-replicate", "--dp", type=int, default=1)
    la.add_argument("--dp-shard", type=int, default=-1)
    la.add_argument("--tp", type=int, default=1)
    la.add_argument("--pp", type=int, default=1)
    la.add_argument("--cp", type=int, default=1, help="context-parallel degree")
    la.add_argument("--layers", type=int, default=0, help="transformer blocks to place")
    la.add_argument("--svg", default="", help="also write the picture to this SVG file")
    la.set_defaults(fn=_layout)

    lc = sub.add_parser(
        "launch", help="run training on N processes / nodes, or as a Slurm / SageMaker job"
    )
    lc.add_argument(
        "--nproc-per-node",
        type=int,
        default=0,
        help="processes per node (default: GPUs, or 2 on CPU)",
    )
    lc.add_argument(
        "--nnodes",
        default="1",
        help="nodes: N, or MIN:MAX for an elastic job (torchrun) that goes on with "
        "at least MIN nodes when nodes are lost",
    )
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
    from triaxis.metrics.hang import add_debug_parser

    add_debug_parser(sub)

    co = sub.add_parser("config", help="print the default config (or --fields: documented)")
    co.add_argument("--fields", action="store_true", help="every field, its default, rule and doc")
    co.add_argument(
        "--markdown",
        action="store_true",
        help="the same as Markdown: the configuration reference, docs/config.md",
    )
    co.set_defaults(fn=_config)

    pl = sub.add_parser("plot", help="loss, val loss, tokens/s, grad norm vs step: an SVG")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders to overlay")
    pl.add_argument("--output", "-o", default="metrics.svg", help="the SVG file to write")
    pl.set_defaults(fn=_plot)
    return p


def _plot(a: argparse.Namespace) -> int:
    from triaxis import storage
    from triaxis.metrics.plot import plot

    storage.check_output_path(a.output, "--output")
    print(plot(a.run_dirs, a.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input: one `error:` line, exit 2. Anything unexpected: one line
    saying it is a bug, exit 1 (the traceback with --debug or TRIAXIS_DEBUG=1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere (train and launch pass unknown arguments on as overrides).
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [x for x in argv if x != "--debug"]
    _printed.clear()
    args = None
    _install_thread_hook(debug, lambda: _user_paths(argv, getattr(args, "rest", None)))
    try:
        parser = build_parser()
        if argv and argv[0] in ("train", "launch"):
            # Everything the subcommand does not know is CONFIG.toml and --section.field
            # overrides.
            args, rest = parser.parse_known_args(argv)
            args.rest = rest
        else:
            args = parser.parse_args(argv)
        check_options(args)
        return args.fn(args)
    except UserError as e:
        _print_once(f"error: {_one_line(str(e))}")
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # The machine's state, not a bug: a full disk, a path that cannot be read or written.
        message = _os_error(e, _user_paths(argv, getattr(args, "rest", None)))
        if message is None or debug:
            if debug:
                raise
            return _bug(e)
        _print_once(f"error: {_one_line(message)}")
        return UserError.exit_code
    except Exception as e:  # noqa: BLE001 - the one place that turns a bug into one line
        if debug:
            raise
        return _bug(e)


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _bug(e: BaseException) -> int:
    _print_once(_bug_line(e))
    return BUG_EXIT


def _bug_line(e: BaseException) -> str:
    return (
        f"error: {type(e).__name__}: {_one_line(str(e))} (this is a bug in triaxis; rerun "
        "with --debug for the traceback)"
    )


_printed: set[str] = set()
"""Error lines printed by this command: a background thread that fails on the same cause
(a TensorBoard writer on the same full disk) adds no second line."""


def _print_once(line: str) -> None:
    if line not in _printed:
        _printed.add(line)
        print(line, file=sys.stderr)


def _install_thread_hook(debug: bool, user_paths: Callable[[], list[str]]) -> None:
    """Uncaught exceptions of background threads in the same one-line form as the main
    thread's (threading prints a traceback by default)."""
    import threading

    def hook(args) -> None:
        if debug or args.exc_type is SystemExit or args.exc_value is None:
            threading.__excepthook__(args)
            return
        e = args.exc_value
        if isinstance(e, UserError):
            _print_once(f"error: {_one_line(str(e))}")
        elif isinstance(e, OSError) and _os_error(e, user_paths()) is not None:
            _print_once(f"error: {_one_line(_os_error(e, user_paths()) or '')}")
        else:
            _print_once(_bug_line(e))

    threading.excepthook = hook


def _os_error(e: OSError, user_paths: list[str]) -> str | None:
    """One line for an OS error on a path the user gave (with the fix), or None: not the
    user's (torch's files, inductor's cache: a bug or the machine's, with its traceback)."""
    from triaxis.errors import os_error_line

    return os_error_line(e, user_paths)


def _user_paths(argv: list[str], rest: list[str] | None) -> list[str]:
    """The paths a command line names: each argument and --option=value (a glob's folder
    part), and for train and launch the paths of the config it loads."""
    import re

    paths = []
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        head = re.split(r"[*?\[]", value)[0]
        if head and not head.startswith("-"):
            paths.append(head)
    if rest is not None and argv[:1] in (["train"], ["launch"]):
        from triaxis.config import load_config, split_config_args

        try:
            paths += load_config(*split_config_args(rest)).user_paths()
        except Exception:  # noqa: BLE001 - no config, no more paths: the arguments remain
            pass
    return paths
