"""The bad-input matrix: for every command, hostile values and broken files give exit status 2,
exactly one `error:` line and no traceback, and leave every file byte-identical.

Each case is one row of CASES: (id, argv with {placeholders} into the workspace, a piece of
the expected error line). The CLI runs in-process (triaxis.cli.main), so the whole table costs
seconds. The workspace (prepared data, a checkpoint, an HF folder, broken copies of each) is
built once; before and after every case it is snapshot as {path: sha256}.
Checkpoint corruption (damaged or crafted checkpoint files) is covered by the checkpoint tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.bad_input_workspace import build, snapshot
from tests.helpers import command
from tests.s3_server import moto_s3  # noqa: F401  (the fixture)
from triaxis.cli import main

TINY = [
    "--model.preset=tiny",
    "--data.seq_len=32",
    "--train.global_batch=8",
    "--train.micro_batch=4",
    "--train.steps=2",
    "--train.val_every=0",
    "--metrics.tensorboard=false",
    "--metrics.progress=false",
    "--train.device=cpu",
]


def _chat(name: str, fmt: str = "chat", tok: str = "hf:{ws}/chat_hf") -> str:
    """A prepare command line over {ws}/NAME.jsonl with --format and --tokenizer."""
    return (
        f"prepare --input {{ws}}/{name}.jsonl --output {{ws}}/out --format {fmt} --tokenizer {tok}"
    )


def _train(*extra: str) -> str:
    """A train command line over the good data into {ws}/run, plus `extra`."""
    return " ".join(["train", "--data.path={ws}/data", "--train.run_dir={ws}/run", *TINY, *extra])


def _mix(toml: str, *extra: str) -> str:
    """A train command line over the mixture config {ws}/`toml` (the ws fixture writes it)."""
    return " ".join(["train", f"{{ws}}/{toml}", "--train.run_dir={ws}/run", *TINY, *extra])


def _launch(backend: str, *extra: str) -> str:
    return " ".join(
        [
            "launch",
            "--backend",
            backend,
            "--dry-run",
            "--nproc-per-node",
            "1",
            "--data.path={ws}/data",
            "--train.run_dir={ws}/run",
            *TINY,
            *extra,
        ]
    )


# (id, argv: split on spaces after {ws} is filled in; "\x1f" joins words that hold spaces,
#  expected piece of the error line)
CASES: list[tuple[str, str, str]] = [
    # -- prepare: options
    (
        "prep-vocab-neg",
        "prepare --input {ws}/good.txt --output {ws}/out --vocab-size -5",
        "--vocab-size -5 must be >= 300",
    ),
    ("prep-vocab-type", "prepare --output {ws}/out --vocab-size many", "invalid int value"),
    (
        "prep-val-nan",
        "prepare --input {ws}/good.txt --output {ws}/out --val-fraction nan",
        "must be a finite number",
    ),
    (
        "prep-val-inf",
        "prepare --input {ws}/good.txt --output {ws}/out --val-fraction inf",
        "must be a finite number",
    ),
    (
        "prep-val-range",
        "prepare --input {ws}/good.txt --output {ws}/out --val-fraction 0.9",
        "--val-fraction 0.9 must be >= 0 and <= 0.5",
    ),
    (
        "prep-shard-zero",
        "prepare --input {ws}/good.txt --output {ws}/out --shard-tokens 0",
        "--shard-tokens 0 must be >= 1",
    ),
    (
        "prep-shard-huge",
        "prepare --input {ws}/good.txt --output {ws}/out --shard-tokens 99999999999999999999999",
        "fit in 64 bits",
    ),
    (
        "prep-max-bytes",
        "prepare --input {ws}/good.txt --output {ws}/out --max-bytes -1",
        "--max-bytes -1 must be >= 0",
    ),
    (
        "prep-workers",
        "prepare --input {ws}/good.txt --output {ws}/out --workers 100000",
        "--workers 100000 must be",
    ),
    (
        "prep-tokenizer",
        "prepare --input {ws}/good.txt --output {ws}/out --tokenizer nope",
        "--tokenizer 'nope' is unknown",
    ),
    (
        "prep-hf-missing",
        "prepare --input {ws}/good.txt --output {ws}/out --tokenizer hf:{ws}/nowhere",
        "nowhere",
    ),
    (
        "prep-eos-bpe",
        "prepare --input {ws}/good.txt --output {ws}/out --eos-token X",
        "applies to --tokenizer hf:PATH only",
    ),
    (
        "prep-vocab-byte",
        "prepare --output {ws}/out --tokenizer byte --vocab-size 500",
        "applies to --tokenizer bpe only",
    ),
    ("prep-output-ctrl", "prepare --input {ws}/good.txt --output {ws}/o\nut", "control char"),
    # -- prepare --format chat / prompt-completion (tests/test_chat.py builds the inputs)
    ("chat-format-unknown", _chat("chat_ok", fmt="yaml"), "--format 'yaml' is unknown"),
    ("chat-needs-hf", _chat("chat_ok", tok="byte"), "needs --tokenizer hf:PATH"),
    ("chat-no-template", _chat("chat_ok", tok="hf:{ws}/chat_hf_plain"), "no chat template"),
    ("chat-unknown-role", _chat("chat_badrole"), "line 2: message 1 has role 'bot'"),
    ("chat-malformed-line", _chat("chat_badjson"), "line 2 is not valid JSON"),
    ("chat-no-messages", _chat("chat_nomessages"), "line 1 has no 'messages' field"),
    ("chat-no-assistant", _chat("chat_noassistant"), "no assistant message"),
    (
        "chat-unstable-template",
        _chat("chat_ok", tok="hf:{ws}/chat_hf_unstable"),
        "renders earlier turns differently",
    ),
    (
        "chat-template-raises",
        _chat("chat_assistant_first", tok="hf:{ws}/chat_hf_strict"),
        "must start with the user",
    ),
    ("chat-eos-ends-turns", _chat("chat_ok", tok="hf:{ws}/chat_hf_eot"), "occurs inside"),
    ("pc-types", _chat("pc_types", fmt="prompt-completion"), "give two strings"),
    ("pc-missing", _chat("pc_missing", fmt="prompt-completion"), "lacks 'prompt' or"),
    # -- prepare --pack-seq-len (tests/test_packing.py): an overlong example under `error`
    (
        "pack-overlong-error",
        _chat("chat_ok") + " --pack-seq-len 8 --overlong error",
        "longer than a packed window of 9",
    ),
    ("pack-overlong-unknown", _chat("chat_ok") + " --overlong split", "--overlong 'split'"),
    # -- prepare: inputs (written late: the staging folder is removed, nothing remains)
    ("prep-missing-input", "prepare --input {ws}/missing.txt --output {ws}/out", "matches no file"),
    (
        "prep-empty-input",
        "prepare --input {ws}/empty.txt --output {ws}/out --tokenizer byte",
        "hold no text",
    ),
    ("prep-empty-input-bpe", "prepare --input {ws}/empty.txt --output {ws}/out", "hold no text"),
    (
        "prep-bad-jsonl",
        "prepare --input {ws}/good.txt --input {ws}/bad.jsonl --output {ws}/out --tokenizer byte",
        "line 2 is not valid JSON",
    ),
    (
        "prep-invalid-utf8-jsonl",
        "prepare --input {ws}/good.txt --input {ws}/latin1.jsonl "
        "--output {ws}/out --tokenizer byte",
        "not valid JSON",
    ),
    # big.txt fills over two chunks of work: with one worker, shards are written before
    # bad.jsonl is read.
    (
        "prep-late-error-nested-out",
        "prepare --input {ws}/big.txt --input {ws}/good.txt "
        "--input {ws}/bad.jsonl --output {ws}/new/deeper/out "
        "--tokenizer byte --shard-tokens 100000 --workers 1",
        "not valid JSON",
    ),
    (
        "prep-late-error-over-data",
        "prepare --input {ws}/big.txt --input {ws}/good.txt "
        "--input {ws}/bad.jsonl --output {ws}/data --tokenizer byte "
        "--shard-tokens 100000 --workers 1",
        "not valid JSON",
    ),
    (
        "prep-truncated-json",
        "prepare --input {ws}/truncated.json --output {ws}/out --tokenizer byte",
        "not valid JSON",
    ),
    (
        "prep-json-no-text",
        "prepare --input {ws}/notext.jsonl --output {ws}/out --tokenizer byte",
        "has no 'text' field",
    ),
    (
        "prep-json-text-type",
        "prepare --input {ws}/numtext.jsonl --output {ws}/out --tokenizer byte",
        "'text' is a int",
    ),
    (
        "prep-binary-text",
        "prepare --input {ws}/binary.parquet.txt --output {ws}/out --tokenizer byte",
        "holds NUL bytes",
    ),
    ("prep-utf16-text", "prepare --input {ws}/utf16.txt --output {ws}/out", "not UTF-8 text"),
    (
        "prep-binary-parquet",
        "prepare --input {ws}/binary.parquet --output {ws}/out --tokenizer byte",
        "binary.parquet",
    ),
    # -- prepare: outputs it must not touch
    (
        "prep-output-file",
        "prepare --input {ws}/good.txt --output {ws}/good.txt --tokenizer byte",
        "is a file",
    ),
    (
        "prep-foreign-bin",
        "prepare --input {ws}/good.txt --output {ws}/foreign --tokenizer byte",
        "holds train_00000.bin",
    ),
    (
        "prep-corrupt-old-manifest",
        "prepare --input {ws}/good.txt --output {ws}/data_badjson --tokenizer byte",
        "not a readable triaxis manifest",
    ),
    (
        "prep-bad-input-over-data",
        "prepare --input {ws}/good.txt --input {ws}/bad.jsonl --output {ws}/data --tokenizer byte",
        "not valid JSON",
    ),
    # -- train: config values
    ("train-lr-nan", _train("--train.lr=nan"), "train.lr=nan must be a finite number"),
    ("train-lr-inf", _train("--train.lr=inf"), "must be a finite number"),
    ("train-lr-neg", _train("--train.lr=-1"), "train.lr=-1.0 must be >= 0"),
    ("train-beta1", _train("--train.beta1=2"), "train.beta1=2.0 must be >= 0 and < 1"),
    ("train-beta2-neg", _train("--train.beta2=-0.1"), "train.beta2=-0.1 must be"),
    ("train-wd-neg", _train("--train.weight_decay=-1"), "train.weight_decay=-1.0 must be"),
    ("train-eps-neg", _train("--model.norm_eps=-1e-5"), "model.norm_eps=-1e-05 must be > 0"),
    ("train-steps-type", _train("--train.steps=many"), "train.steps='many' must be int"),
    ("train-steps-float", _train("--train.steps=2.5"), "must be int"),
    ("train-steps-huge", _train("--train.steps=99999999999999999999999"), "fit in 64 bits"),
    ("train-steps-zero", _train("--train.steps=0"), "train.steps=0 must be >= 1"),
    ("train-seq-neg", _train("--data.seq_len=-3"), "data.seq_len=-3 must be >= 1"),
    ("train-clip-nan", _train("--train.grad_clip=nan"), "train.grad_clip=nan"),
    ("train-bool", _train("--metrics.tensorboard=maybe"), "must be a boolean"),
    ("train-choice", _train("--train.device=tpu"), "not a valid choice"),
    ("train-unknown-key", _train("--train.stepz=3"), "did you mean train.steps"),
    ("train-unknown-section", _train("--trian.steps=3"), "did you mean [train]"),
    ("train-no-value", _train("--train.steps"), "has no value"),
    ("train-run-dir-newline", _train("--train.run_dir={ws}/r\nx"), "control character"),
    ("train-run-dir-nul", _train("--train.run_dir={ws}/r\x00x"), "control character"),
    ("train-verify-mode", _train("--data.verify=md5"), "data.verify='md5' is not a valid"),
    ("train-vocab-small", _train("--model.vocab_size=100"), "smaller than the data's"),
    ("train-tp-world", _train("--parallel.tp=2"), "world size 1"),
    ("train-cp-world", _train("--parallel.cp=2"), "dp_replicate x tp x pp x cp = 1 x 1 x 1 x 2"),
    (
        "launch-cp-world",
        _launch("local", "--nproc-per-node", "4", "--parallel.cp=3", "--parallel.dp_shard=1"),
        "dp_shard x cp x tp = 1 x 1 x 1 x 3 x 1 = 3 but the world size is 4",
    ),
    (
        "launch-cp-seq-len",
        _launch("local", "--nproc-per-node", "2", "--parallel.cp=2", "--data.seq_len=30"),
        "data.seq_len=30 is not divisible by 2 x parallel.cp = 4",
    ),
    (
        "launch-cp-hierarchical",
        _launch("local", "--nproc-per-node", "2", "--parallel.cp=2", "--parallel.hierarchical=on"),
        "parallel.hierarchical=on with parallel.cp=2",
    ),
    (
        "train-hierarchical-one-node",
        _train("--parallel.hierarchical=on"),
        "parallel.hierarchical=on needs a dp_shard group that spans nodes",
    ),
    (
        "train-offload-no-ac",
        _train("--parallel.activation_offload=true"),
        "activation_checkpoint=full or drop activation_offload",
    ),
    (
        "train-offload-op-ac",
        _train(
            "--parallel.activation_offload=true",
            "--parallel.activation_checkpoint=selective",
            "--parallel.ac_selective=op",
        ),
        "ac_selective='op' checkpoints no whole block",
    ),
    (
        "train-docmask-no-eos",
        _train("--data.path=synthetic", "--data.document_mask=true"),
        "data.document_mask=true needs an end-of-document token",
    ),
    (
        "train-docmask-manifest-no-eos",
        _train("--data.path={ws}/data_noeos", "--data.document_mask=true"),
        "data_noeos has none (tokenizer byte)",
    ),
    (
        "train-doctokens-no-mask",
        _train("--data.mean_document_tokens=512"),
        "data.mean_document_tokens=512 counts masked attention FLOPs",
    ),
    ("train-doctokens-neg", _train("--data.mean_document_tokens=-1"), "must be >= 0"),
    # -- train: config files
    ("train-config-missing", "train {ws}/missing.toml", "does not exist"),
    ("train-config-binary", "train {ws}/binary.toml", "not UTF-8"),
    ("train-config-invalid", "train {ws}/bad.toml", "not valid TOML"),
    ("train-config-not-table", "train {ws}/notable.toml", "must be a [section] table"),
    ("train-config-wrong-type", "train {ws}/wrongtype.toml", "must be int"),
    ("train-config-folder", "train {ws}/data", "does not exist"),
    ("train-config-empty", "train {ws}/empty.toml", "data/stdlib does not exist"),
    # -- train: numbers no field holds (issue 24.2)
    ("cfg-int-inf", "train {ws}/int_inf.toml", "train.steps=inf must be a whole number"),
    ("cfg-int-nan", "train {ws}/int_nan.toml", "train.steps=nan must be a whole number"),
    ("cfg-int-neginf", "train {ws}/int_neginf.toml", "data.seq_len=-inf must be a whole"),
    ("cfg-optint-inf", "train {ws}/optint_inf.toml", "model.vocab_size=inf must be a whole"),
    ("cfg-float-inf", "train {ws}/float_inf.toml", "train.lr=inf must be a finite number"),
    ("cfg-float-bigint", "train {ws}/float_bigint.toml", "(401 digits) is too large for a float"),
    ("cfg-mix-inf", "train {ws}/mix_inf.toml", "data.sources[0].epochs=-inf must be a finite"),
    ("train-steps-inf", _train("--train.steps=inf"), "train.steps='inf' must be int"),
    ("train-steps-neginf", _train("--train.steps=-inf"), "train.steps='-inf' must be int"),
    ("train-vocab-nan", _train("--model.vocab_size=nan"), "model.vocab_size='nan' must be int"),
    (
        "launch-int-inf",
        "launch --backend sagemaker --dry-run --nproc-per-node 1 {ws}/int_inf.toml",
        "train.steps=inf must be a whole number",
    ),
    # -- train: data
    ("data-missing", _train("--data.path={ws}/nowhere"), "does not exist"),
    ("data-not-prepared", _train("--data.path={ws}/foreign"), "has no manifest.json"),
    ("data-manifest-json", _train("--data.path={ws}/data_badjson"), "is not valid JSON"),
    ("data-manifest-trunc", _train("--data.path={ws}/data_truncjson"), "is not valid JSON"),
    ("data-manifest-fields", _train("--data.path={ws}/data_badfields"), "is damaged"),
    ("data-manifest-escape", _train("--data.path={ws}/data_escape"), "not a plain file name"),
    ("data-manifest-binary", _train("--data.path={ws}/data_binjson"), "manifest.json"),
    ("data-shard-missing", _train("--data.path={ws}/data_noshard"), "is missing"),
    ("data-shard-odd", _train("--data.path={ws}/data_odd"), "bytes but the manifest says"),
    ("data-shard-empty", _train("--data.path={ws}/data_empty"), "bytes but the manifest says"),
    ("data-shard-half", _train("--data.path={ws}/data_half"), "bytes but the manifest says"),
    ("data-shard-flipped", _train("--data.path={ws}/data_flip"), "fails its sha256 check"),
    (
        "data-val-flipped",
        _train("--data.path={ws}/data_valflip", "--train.val_every=1"),
        "val_00000.bin fails its sha256 check",
    ),
    ("data-token-range", _train("--data.path={ws}/data_bigtok"), "outside the data's vocab"),
    # -- train: weighted mixtures ([[data.sources]])
    ("mix-weight-zero", _mix("mix_w0.toml"), "data.sources[1].weight=0.0 must be > 0"),
    ("mix-weight-neg", _mix("mix_wneg.toml"), "data.sources[0].weight=-2.0 must be > 0"),
    ("mix-empty", _mix("mix_empty.toml"), "data.sources is an empty list"),
    ("mix-and-path", _mix("mix_ok.toml", "--data.path={ws}/data"), "are both set"),
    ("mix-tokenizer", _mix("mix_tok.toml"), "data.sources[1]"),
    ("mix-no-path", _mix("mix_nopath.toml"), "data.sources[0] has no path"),
    ("mix-same-name", _mix("mix_dup.toml"), "are both named 'data'"),
    ("mix-key-typo", _mix("mix_typo.toml"), "did you mean weight?"),
    ("mix-epochs-zero", _mix("mix_ep0.toml"), "data.sources[0].epochs=0.0 must be > 0"),
    ("mix-epochs-tiny", _mix("mix_short.toml"), "is no whole sample"),
    ("mix-too-short", _mix("mix_cap.toml", "--train.steps=99999999"), "but train.steps"),
    ("mix-override", _mix("mix_ok.toml", "--data.sources=x"), "[[data.sources]] tables"),
    (
        "mix-sagemaker",
        "launch --backend sagemaker --dry-run --nproc-per-node 1 {ws}/mix_ok.toml "
        "--train.run_dir={ws}/run",
        "does not run on --backend sagemaker",
    ),
    # -- launch: each backend's dry run
    ("launch-local-lr", _launch("local", "--train.lr=nan"), "train.lr=nan"),
    ("launch-torchrun-beta", _launch("torchrun", "--train.beta1=1"), "train.beta1=1.0"),
    ("launch-slurm-name", _launch("slurm", "--job-name", "a\nb"), "control character"),
    ("launch-slurm-hetjob", _launch("slurm", "--job-name", "my-hetjob"), "heterogeneous"),
    ("launch-slurm-cfg", _launch("slurm", "--train.steps=-1"), "train.steps=-1"),
    ("launch-sagemaker-cfg", _launch("sagemaker", "--train.lr=inf"), "train.lr=inf"),
    ("launch-nnodes", _launch("local", "--nnodes", "x"), "--nnodes='x' is not N or MIN:MAX"),
    ("launch-nproc", _launch("local", "--nproc-per-node", "-3"), "--nproc-per-node -3"),
    ("launch-restarts", _launch("torchrun", "--max-restarts", "-1"), "--max-restarts -1"),
    ("launch-rdzv-nan", _launch("torchrun", "--rdzv-timeout", "nan"), "--rdzv-timeout nan"),
    ("launch-backend", _launch("kubernetes"), "invalid choice"),
    # -- generate
    ("gen-top-k", "generate --checkpoint {ws}/ckpt --top-k -1", "--top-k -1 must be >= 0"),
    (
        "gen-temp-neg",
        "generate --checkpoint {ws}/ckpt --temperature -0.5",
        "--temperature -0.5 must be >= 0",
    ),
    ("gen-temp-nan", "generate --checkpoint {ws}/ckpt --temperature nan", "finite"),
    (
        "gen-max-new",
        "generate --checkpoint {ws}/ckpt --max-new-tokens 0",
        "--max-new-tokens 0 must be >= 1",
    ),
    (
        "gen-max-new-huge",
        "generate --checkpoint {ws}/ckpt --max-new-tokens 10000000000",
        "--max-new-tokens 10000000000 must be",
    ),
    ("gen-seed", "generate --checkpoint {ws}/ckpt --seed -1", "--seed -1 must be >= 0"),
    ("gen-device", "generate --checkpoint {ws}/ckpt --device tpu", "not a torch device"),
    ("gen-device-index", "generate --checkpoint {ws}/ckpt --device cuda:x", "not a torch device"),
    ("gen-no-data", "generate --checkpoint {ws}/ckpt", "records no data folder; pass --data"),
    (
        "gen-data-missing",
        "generate --checkpoint {ws}/ckpt --data {ws}/nowhere",
        "data path {ws}/nowhere does not exist",
    ),
    ("gen-missing", "generate --checkpoint {ws}/nowhere", "nowhere"),
    ("gen-no-ckpt", "generate", "required: --checkpoint"),
    # -- ckpt
    ("ckpt-no-verb", "ckpt", "required: verb"),
    ("ckpt-list-missing", "ckpt list {ws}/nowhere", "nowhere"),
    ("ckpt-verify-missing", "ckpt verify {ws}/nowhere", "nowhere"),
    ("ckpt-verify-step", "ckpt verify {ws}/ckpt --step x", "invalid int value"),
    # -- import-hf (the existing checkpoint in {ws}/ckpt must survive --force)
    ("imp-missing", "import-hf {ws}/nowhere --output {ws}/ckpt --force", "is not a folder"),
    ("imp-no-config", "import-hf {ws}/foreign --output {ws}/ckpt --force", "no config.json"),
    ("imp-bad-config", "import-hf {ws}/hf_badconfig --output {ws}/ckpt --force", "config.json"),
    ("imp-binary-config", "import-hf {ws}/hf_binconfig --output {ws}/ckpt --force", "config.json"),
    (
        "imp-trunc-weights",
        "import-hf {ws}/hf_truncweights --output {ws}/ckpt --force",
        "model.safetensors",
    ),
    ("imp-config-str", "import-hf {ws}/hf_strconfig --output {ws}/ckpt --force", "hidden_size"),
    (
        "imp-config-neg",
        "import-hf {ws}/hf_negconfig --output {ws}/ckpt --force",
        "num_hidden_layers",
    ),
    ("imp-config-nan", "import-hf {ws}/hf_nanconfig --output {ws}/ckpt --force", "rms_norm_eps"),
    ("imp-config-list", "import-hf {ws}/hf_listconfig --output {ws}/ckpt --force", "config.json"),
    ("imp-index-escape", "import-hf {ws}/hf_badindex --output {ws}/ckpt --force", "passwd"),
    ("imp-no-force", "import-hf {ws}/hf --output {ws}/ckpt", "not empty"),
    ("imp-output-file", "import-hf {ws}/hf --output {ws}/good.txt", "is a file"),
    # -- export-hf (the existing export in {ws}/export must survive --force)
    ("exp-missing", "export-hf {ws}/nowhere {ws}/export --force", "nowhere"),
    ("exp-not-ckpt", "export-hf {ws}/foreign {ws}/export --force", "foreign"),
    ("exp-shard-nan", "export-hf {ws}/ckpt {ws}/export --force --max-shard-gb nan", "finite"),
    (
        "exp-shard-neg",
        "export-hf {ws}/ckpt {ws}/export --force --max-shard-gb -1",
        "--max-shard-gb -1",
    ),
    ("exp-no-force", "export-hf {ws}/ckpt {ws}/export", "not empty"),
    ("exp-output-file", "export-hf {ws}/ckpt {ws}/good.txt", "is a file"),
    ("exp-under-file", "export-hf {ws}/ckpt {ws}/good.txt/hf", "good.txt is not a folder"),
    ("imp-under-file", "import-hf {ws}/hf --output {ws}/good.txt/c", "good.txt is not a folder"),
    (
        "prep-under-file",
        "prepare --input {ws}/good.txt --output {ws}/good.txt/out --tokenizer byte",
        "good.txt is not a folder",
    ),
    # -- output files: checked before anything is printed or computed (issue 24.5)
    ("layout-svg-dir", "layout --world 8 --svg {ws}/nowhere/l.svg", "nowhere does not exist"),
    ("layout-svg-folder", "layout --world 8 --svg {ws}/data", "is a folder; give a file name"),
    ("layout-svg-under-file", "layout --world 8 --svg {ws}/good.txt/l.svg", "is not a folder"),
    ("layout-pp-layers", "layout --world 8 --pp 4 --layers 2", "--pp 4 is larger than"),
    (
        "plan-write-dir",
        "plan --model tiny --gpus 8 --gpu h100 --seq 128 --write {ws}/nowhere/plan.toml",
        "--write {ws}/nowhere/plan.toml: {ws}/nowhere does not exist",
    ),
    (
        "plan-write-folder",
        "plan --model tiny --gpus 8 --gpu h100 --seq 128 --write {ws}/data",
        "is a folder",
    ),
    (
        "plan-write-s3",
        "plan --model tiny --gpus 8 --gpu h100 --seq 128 --write s3://b/plan.toml",
        "this file is written locally",
    ),
    # -- plan, layout, net, config
    ("plan-gpus-zero", "plan --model tiny --gpus 0", "--gpus"),
    ("plan-gpus-type", "plan --model tiny --gpus eight", "invalid int value"),
    ("plan-model", "plan --model nosuch --gpus 8 --gpu h100", "nosuch"),
    ("plan-seq", "plan --model tiny --gpus 8 --seq 0", "--seq"),
    ("plan-batch", "plan --model tiny --gpus 8 --global-batch -4", "--global-batch"),
    (
        "plan-vocab",
        "plan --model tiny --gpus 8 --gpu h100 --seq 128 --vocab-size -5",
        "--vocab-size -5 must be >= 1",
    ),
    (
        "plan-gpn",
        "plan --model tiny --gpus 8 --gpu h100 --seq 128 --gpus-per-node 0",
        "--gpus-per-node 0 must be >= 1",
    ),
    ("net-timeout", "net bench --nproc-per-node 2 --rdzv-timeout nan", "--rdzv-timeout nan"),
    ("ckpt-step-neg", "ckpt verify {ws}/ckpt --step -1", "--step -1 must be >= 0"),
    (
        "plan-hardware-missing",
        "plan --model tiny --gpus 8 --hardware {ws}/nowhere.toml",
        "nowhere.toml",
    ),
    (
        "plan-hardware-binary",
        "plan --model tiny --gpus 8 --hardware {ws}/binary.toml",
        "binary.toml",
    ),
    ("layout-world", "layout --world 3 --tp 2", "world size 3"),
    ("layout-tp-zero", "layout --world 4 --tp 0", "tp"),
    ("layout-neg", "layout --world -4", "world"),
    ("layout-type", "layout --world four", "invalid int value"),
    ("net-verb", "net nosuch", "invalid choice"),
    ("net-nnodes", "net bench --nnodes x", "invalid int value"),
    ("config-flag", "config --bogus", "unrecognized arguments"),
    ("no-command", "", "required: command"),
    ("bad-command", "fly", "invalid choice"),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, byte_data) -> Path:
    """The workspace every case runs against (built once, never changed by a case)."""
    return build(tmp_path_factory.mktemp("ws"), byte_data)


def run_cli(argv: list[str], capsys, out: list[str] | None = None) -> tuple[int, str]:
    """(exit status, stderr); stdout is appended to `out` when given."""
    try:
        code = main(argv)
    except SystemExit as e:  # only --help / --version may exit; bad input must return
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    if out is not None:
        out.append(captured.out)
    return code, captured.err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, ws, capsys, monkeypatch):
    name, command, expect = case
    monkeypatch.chdir(ws)  # relative defaults (data/stdlib, runs/default) land in the snapshot
    monkeypatch.setenv("TRIAXIS_CACHE_DIR", str(ws.parent / f"{ws.name}-cache"))
    argv = [w.replace("{ws}", str(ws)) for w in command.split(" ")] if command else []
    before = snapshot(ws)
    out: list[str] = []
    code, err = run_cli(argv, capsys, out)
    after = snapshot(ws)
    lines = err.strip().splitlines()
    errors = [x for x in lines if "error:" in x]
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert "this is a bug" not in err, err
    assert expect.replace("{ws}", str(ws)) in errors[0], errors[0]
    if not command.startswith("prepare"):  # prepare logs its progress (tokenizer) as it works
        assert out == [""], out  # no table or partial output before the error
    assert after == before, {
        k: (before.get(k), after.get(k))
        for k in set(before) | set(after)
        if before.get(k) != after.get(k)
    }


def test_unexpected_error_is_one_line_and_debug_shows_it(monkeypatch, capsys):
    """A bug (any exception that is not bad input) is one line saying so, exit 1; --debug and
    TRIAXIS_DEBUG=1 show the traceback."""
    import triaxis.cli as cli

    def broken(a):
        raise RuntimeError("kaboom\nsecond line")

    real = cli.build_parser

    def parser():
        p = real()
        p._subparsers._group_actions[0].choices["config"].set_defaults(fn=broken)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["config"]) == cli.BUG_EXIT
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: RuntimeError: kaboom second line (this is a bug in triaxis; rerun with --debug "
        "for the traceback)"
    ]
    with pytest.raises(RuntimeError, match="kaboom"):
        cli.main(["config", "--debug"])
    monkeypatch.setenv("TRIAXIS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaboom"):
        cli.main(["config"])


def test_background_thread_errors_are_one_line_too(monkeypatch, capsys):
    """A writer thread (TensorBoard's) that meets the same full disk as the main thread adds no
    traceback and no second line; a bug in a thread is one line saying so."""
    import errno
    import threading

    import triaxis.cli as cli

    def fails_in_a_thread(a):
        def write():
            raise OSError(errno.ENOSPC, "No space left on device", "/run/tb/events")

        t = threading.Thread(target=write)
        t.start()
        t.join()
        raise OSError(errno.ENOSPC, "No space left on device", "/run/tb/events")

    real = cli.build_parser

    def parser():
        p = real()
        p._subparsers._group_actions[0].choices["config"].set_defaults(fn=fails_in_a_thread)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: /run/tb/events: the disk is full; free space or write elsewhere"
    ]
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: ZeroDivisionError: division by zero (this is a bug in triaxis; rerun with "
        "--debug for the traceback)"
    ]


def test_full_disk_is_one_line(tmp_path, capsys, byte_data):
    """A full disk under prepare's output and under train.run_dir: one line, exit 2, and
    prepare leaves nothing behind."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        (disk / "keep.txt").write_text("kept")
        before = snapshot(disk)
        big = tmp_path / "big.txt"
        big.write_text("x = 1\n" * 100_000)
        code, err = run_cli(
            ["prepare", "--input", str(big), "--output", str(disk / "out"), "--tokenizer", "byte"],
            capsys,
        )
        assert code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("error: ") and "disk is full" in err
        assert f"--output {disk / 'out'}" in err and "nothing was changed" in err
        assert len([x for x in err.splitlines() if "error:" in x]) == 1
        assert snapshot(disk) == before
        (disk / "filler").write_bytes(b"\0" * (60 * 1024))  # leave ~nothing for run_dir
        # As a user runs it: a subprocess, TensorBoard on (its writer thread meets the full
        # disk too, and must not add a traceback).
        proc = subprocess.run(
            command(
                "train",
                f"--data.path={byte_data}",
                f"--train.run_dir={disk / 'run'}",
                *TINY,
                "--metrics.tensorboard=true",
            ),
            capture_output=True,
            text=True,
            timeout=600,
        )
        err = proc.stderr
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert len([x for x in err.splitlines() if "error:" in x]) == 1, err
        assert "disk is full" in err, err
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: no unreadable path")
def test_unreadable_input_is_one_line(tmp_path, capsys):
    f = tmp_path / "secret.txt"
    f.write_text("text")
    f.chmod(0)
    code, err = run_cli(["prepare", "--input", str(f), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "Traceback" not in err and "permission denied" in err


def test_s3_output_is_untouched_by_bad_input(ws, moto_s3, capsys):
    """On s3:// too: a preparation that fails late, an output holding files prepare did not
    write, or a missing bucket leave every object as it was (one line, exit 2)."""
    from triaxis.data.prepare import PrepareOptions, prepare

    bucket = moto_s3.new_bucket()
    out = f"s3://{bucket}/data"
    prepare(
        PrepareOptions(inputs=[str(ws / "good.txt")], output=out, tokenizer="byte"),
        log=lambda *_: None,
    )
    moto_s3.put(f"s3://{bucket}/other/train_00000.bin", b"someone else's")

    def bucket_state() -> dict[str, bytes]:
        return {k: moto_s3.get(f"s3://{bucket}/{k}") for k in moto_s3.keys(f"s3://{bucket}/")}

    before = bucket_state()
    for argv, expect in (
        (
            ["--input", str(ws / "good.txt"), "--input", str(ws / "bad.jsonl"), "--output", out],
            "not valid JSON",
        ),
        (
            ["--input", str(ws / "good.txt"), "--output", f"s3://{bucket}/other"],
            "holds train_00000.bin",
        ),
        (
            ["--input", str(ws / "good.txt"), "--output", f"s3://{bucket}-missing/x"],
            "does not exist",
        ),
    ):
        code, err = run_cli(["prepare", "--tokenizer", "byte", *argv], capsys)
        errors = [x for x in err.splitlines() if "error:" in x]
        assert code == 2 and len(errors) == 1 and expect in errors[0], err
        assert "Traceback" not in err
        assert bucket_state() == before


def test_force_replaces_only_the_model_files(ws, tmp_path, capsys):
    """--force that works: export-hf swaps the model files and keeps a user's own files;
    import-hf swaps the checkpoint and leaves a committed one behind."""
    export = tmp_path / "export"
    shutil.copytree(ws / "export", export)
    (export / "model-00001-of-00009.safetensors").write_bytes(b"stale shard of an old export")
    assert main(["export-hf", str(ws / "ckpt"), str(export), "--force"]) == 0
    names = sorted(p.name for p in export.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".export*"))  # the staging sibling is gone
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ws / "ckpt", ckpt)
    (ckpt / "notes.txt").write_text("mine")
    assert main(["import-hf", str(ws / "hf"), "--output", str(ckpt), "--force"]) == 0
    meta = json.loads((ckpt / "triaxis.json").read_text())
    assert meta["source"].startswith("hf:") and (ckpt / "notes.txt").read_text() == "mine"
    assert set(meta["files"]) <= {p.name for p in ckpt.iterdir()}
    assert not list(tmp_path.glob(".ckpt.import*"))
    capsys.readouterr()


def test_prepare_again_replaces_only_its_own_files(ws, tmp_path):
    """A successful prepare over an earlier one: the old manifest's files that the new one does
    not list go, everything else in the folder stays."""
    from triaxis.data.prepare import PrepareOptions, prepare

    out = tmp_path / "out"
    first = prepare(
        PrepareOptions(
            inputs=[str(ws / "big.txt")], output=str(out), tokenizer="byte", shard_tokens=200_000
        ),
        log=lambda *_: None,
    )
    assert len(first["splits"]["train"]["shards"]) > 2
    (out / "mine.bin").write_bytes(b"a user's file")
    (out / "notes.txt").write_text("keep")
    second = prepare(
        PrepareOptions(inputs=[str(ws / "good.txt")], output=str(out), tokenizer="byte"),
        log=lambda *_: None,
    )
    listed = {s["file"] for split in second["splits"].values() for s in split["shards"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        listed | {"manifest.json", "mine.bin", "notes.txt"}
    )
