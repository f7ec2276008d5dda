#!/usr/bin/env bash
# Create .venv with triaxis (idempotent). `setup.sh test` adds the test dependencies.
# TORCH_SPEC picks the PyTorch build: the default is the pinned CPU wheel; on a GPU machine use
# e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index of your choice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extra="" check="import triaxis, torch, tokenizers, safetensors, rich, s3fs, xxhash"
if [ "${1:-}" = "test" ]; then
  extra="[test]" check="$check, pytest, boto3, moto, transformers, pyarrow, importlinter, torchao, mlflow, flask_cors, alembic, pandas, wandb"
fi
# ruff is a binary, not a module: a test venv without it installs the extra too.
if ! .venv/bin/python -c "$check" 2>/dev/null || { [ -n "$extra" ] && [ ! -x .venv/bin/ruff ]; }; then
  .venv/bin/pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
  # The constraints pin the versions the tests were run with; torch stays what TORCH_SPEC chose.
  grep -v '^torch==' scripts/constraints.txt > .venv/constraints.txt
  .venv/bin/pip install -q --disable-pip-version-check -c .venv/constraints.txt -e ".$extra"
fi
