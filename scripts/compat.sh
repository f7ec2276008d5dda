#!/usr/bin/env bash
# The fast lane under another PyTorch: `scripts/compat.sh 2.11.0 [pytest args]`.
# Builds .venv-torch-VERSION (once; gitignored) with that torch -- a wheel from TORCH_WHEELS
# when one lies on disk, else the package index -- plus triaxis and its test extras at the
# versions scripts/constraints.txt pins (torch excluded), then runs `pytest -m "not slow"` there
# with the extra arguments passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-}
if ! [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "scripts/compat.sh: torch version '${version}' is not X.Y.Z; e.g. scripts/compat.sh 2.11.0" >&2
  exit 2
fi
shift
PY=${PYTHON:-python3}
# The supported range is pyproject.toml's (torch>=A,<B); outside it pip would swap torch out.
"$PY" - "$version" <<'EOF' || exit 2
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if re.match(r"torch\b", d))
lo, hi = re.fullmatch(r"torch>=([\d.]+),<([\d.]+)", spec).groups()
key = lambda v: tuple(int(x) for x in v.split("."))
if not key(lo) <= key(sys.argv[1]) < key(hi):
    sys.exit(f"scripts/compat.sh: torch {sys.argv[1]} is outside the supported {spec} "
             "(pyproject.toml); choose a version in that range")
EOF
venv=".venv-torch-$version"
check="import sys, torch, triaxis, xxhash, pytest, boto3, moto, transformers, pyarrow, importlinter, peft, torchao
sys.exit(torch.__version__.split('+')[0] != '$version')"
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "$check" 2>/dev/null; then
  tag=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  spec="torch==$version"
  for dir in ${TORCH_WHEELS:-/opt/wheels /opt/pypi-more/files}; do
    for wheel in "$dir"/torch-"$version"{,+*}-"$tag"-"$tag"-*linux*x86_64.whl; do
      [ -f "$wheel" ] && spec=$wheel && break 2
    done
  done
  echo "scripts/compat.sh: installing $spec into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "$spec"
  grep -v '^torch==' scripts/constraints.txt > "$venv/constraints.txt"
  "$venv/bin/pip" install -q --disable-pip-version-check -c "$venv/constraints.txt" -e ".[test]"
  "$venv/bin/python" -c "$check"
fi
"$venv/bin/python" -c 'import torch; print(f"scripts/compat.sh: torch {torch.__version__}")'
exec "$venv/bin/python" -m pytest -m "not slow" "$@"
