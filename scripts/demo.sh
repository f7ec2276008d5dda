#!/usr/bin/env bash
# The main job: set up, prepare the embedded corpus (the Python standard library's sources),
# train the `small` model with sharded data parallel on 2 processes, print a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
[ -f data/stdlib/manifest.json ] || triaxis prepare --output data/stdlib
run="runs/demo-$(date +%Y%m%d-%H%M%S)"
triaxis launch --nproc-per-node 2 configs/demo.toml --train.run_dir="$run" "$@"
echo "--- sample ---"
triaxis generate --checkpoint "$run" --prompt "def " --max-new-tokens 120 --temperature 0.7
echo "--- run folder: $run (metrics.jsonl, tb/, checkpoints/) ---"
