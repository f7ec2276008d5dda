"""The bad-input matrix's rows for `launch`, `generate`, `ckpt`, `import-hf`, `export-hf`, output
files, `plan`, `layout`, `net` and `config` (tests/test_bad_input.py runs them)."""

from __future__ import annotations

from tests.bad_input_cases import _launch

COMMAND_CASES: list[tuple[str, str, str]] = [
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
    (
        "launch-memory-interval",
        _launch("local", "--checkpoint.interval=10", "--checkpoint.memory_interval=20"),
        "checkpoint.memory_interval=20 is over checkpoint.interval=10",
    ),
    (
        "launch-memory-keep",
        _launch("local", "--checkpoint.memory_interval=1", "--checkpoint.memory_keep=0"),
        "checkpoint.memory_keep=0",
    ),
    (
        "launch-memory-buddy",
        _launch("local", "--checkpoint.memory_interval=1", "--checkpoint.memory_buddy=on"),
        "a buddy replica lives on another node",
    ),
    (
        "launch-memory-fits",
        _launch("local", "--model.preset=70b", "--checkpoint.memory_interval=1"),
        "the memory tier needs",
    ),
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
    ("plan-memory-keep", "plan --model tiny --gpus 8 --memory-keep -1", "--memory-keep=-1 must"),
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
