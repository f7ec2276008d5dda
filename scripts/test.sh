#!/usr/bin/env bash
# The test suite: unit, multi-process parity (gloo on CPU) and end-to-end CLI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
