"""The bad-input matrix's rows for `prepare` and `train` (tests/test_bad_input.py runs them), and
the command-line builders every row uses."""

from __future__ import annotations

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
PREPARE_TRAIN_CASES: list[tuple[str, str, str]] = [
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
    # -- prepare --format chat / prompt-completion (tests/chat_data.py builds the inputs)
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
]
