#!/usr/bin/env bash
# The one prepared device check (issue 23), sized for one `run` on a lent H100/H200 (15 minutes
# of device time per session, 10 per command). Prepare .peer/ (git-ignored, so `carry` takes it)
# once, from the repository root. .peer/site holds what the machine lacks: xxhash (a declared
# dependency of triaxis: checkpoint checksums; a CPython 3.12 wheel, the machine's Python) and the
# pytest wheels (~15 MB) for part host-sync, in case the machine has no pytest:
#
#   mkdir -p .peer && cp ../shared/bench/hf_llama_baseline.py .peer/
#   .venv/bin/pip install --no-deps --target .peer/site --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 xxhash pytest pluggy iniconfig packaging pygments
#   run(command="bash bench/gpu_session.sh", carry=[".peer"], timeout_s=480)
#
# The float8 rows (issue 29) are a session of their own, opt-in: carry torchao 0.18.0 (the wheel
# torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.whl, ~26 MB unpacked, built for torch 2.11):
#
#   .venv/bin/pip install --no-deps --target .peer/site --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 torchao==0.18.0
#   run(command="TRIAXIS_GPU_DEADLINE_S=570 TRIAXIS_GPU_PARTS=f8-1b-bf16,f8-1b-tensorwise,\
#     f8-1b-rowwise,f8-8bw-bf16,f8-8bw-tensorwise,f8-8bw-rowwise bash bench/gpu_session.sh",
#     carry=[".peer"], timeout_s=600)
#
# The cp-kernels part (issue 26) proves ring attention's fused CUDA kernels (flash, efficient)
# against its math kernel and plain SDPA; alone, on a machine with no .peer:
#
#   run(command="TRIAXIS_GPU_PARTS=cp-kernels bash bench/gpu_session.sh", timeout_s=180)
#
# The machine's own python3 holds torch, transformers and tokenizers; triaxis runs from the
# checkout (PYTHONPATH), nothing is installed. All parts share one deadline (450 s); each part
# gets min(its cap, time left) and is then SIGKILLed. Everything lands in $OUT: log.txt (all
# output, the card first), rows.jsonl (one row per part, as it ends), summary.txt (printed last).
# After a partial run, rerun only the missing parts: TRIAXIS_GPU_PARTS=hf-eager,host-sync (a
# fresh $OUT: merge the two rows.jsonl here, `python bench/gpu_summary.py ALL_ROWS`; plan-check
# reads the triaxis speed rows of its own run).
# CPU dry run of the same plumbing: DEV=cpu bash bench/gpu_session.sh (tests/test_gpu_session.py).
set -u
export PYTHONPATH=$PWD:$PWD/.peer/site PYTHONUNBUFFERED=1 TRIAXIS_DEBUG=1
export OUT=${OUT:-/tmp/triaxis-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
{
  echo "== card ($(date +%T))"
  if [ "${DEV:-cuda}" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)" 2>&1
} | tee -a "$OUT/log.txt"
exec "$PY" bench/gpu_session.py
