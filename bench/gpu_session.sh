#!/usr/bin/env bash
# The one prepared device check of issues 7 and 9, sized for one `run` on a lent H100/H200
# (15 minutes of device time per session, 10 per command). From the repository root here:
#
#   mkdir -p .peer && cp ../shared/bench/hf_llama_baseline.py .peer/
#   echo /.peer/ >> .git/info/exclude
#   run(command="bash bench/gpu_session.sh", carry=[".peer"], timeout_s=570)
#
# The machine's own python3 holds torch, transformers and tokenizers; triaxis runs from the
# checkout (PYTHONPATH), nothing is installed. Everything lands in $OUT: log.txt (all output,
# the card first) and gpu_speed.json. Each part has its own time limit, so a slow part costs
# only itself; the order puts the cheapest, most wanted figures first.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/triaxis-gpu}
mkdir -p "$OUT"
log() { tee -a "$OUT/log.txt"; }
part() { echo "== $1 ($(date +%T))" | log; }

part card
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | log
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | log

# Issue 7: the planner's peak memory against torch.cuda.max_memory_allocated (within 15%).
for args in "--micro-batch 2 --ac full" "--micro-batch 4 --ac selective" "--micro-batch 8 --ac none"; do
  part "plan_gpu_memory 1b seq 2048 $args"
  timeout 90 python3 bench/plan_gpu_memory.py --preset 1b --seq 2048 $args 2>&1 | log
done

# Issue 9: the fused, chunked loss against the plain head at the 1b preset's head and batch.
part "loss_memory (1b head, 8 x 2048 tokens)"
timeout 90 python3 bench/loss_memory.py --device cuda --dim 2048 --layers 2 --batch 8 \
  --seq 2048 --chunks 0 4096 8192 2>&1 | log

# Issue 9: triaxis 1b (and FSDP at dp_shard=1) beside the Hugging Face baseline, eager and
# compiled, in one invocation.
part "gpu_speed"
timeout 330 python3 bench/gpu_speed.py --baseline .peer/hf_llama_baseline.py --steps 15 \
  --out "$OUT/gpu_speed.json" 2>&1 | log
part done
