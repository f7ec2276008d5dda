#!/usr/bin/env bash
# The test suite: unit, multi-process parity (gloo on CPU) and end-to-end CLI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Slurm + munge and the network-namespace tools the multi-node tests start (apt, as root;
# without root those tests skip and say why).
bash scripts/ci_services.sh
# Lint first ([tool.ruff] in pyproject.toml): a finding fails the command before any test runs.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
