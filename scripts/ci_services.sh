#!/usr/bin/env bash
# What the multi-node tests need beyond the venv (idempotent; a no-op when all is there):
#   Slurm + munge (Debian's slurm-wlm 22.05: tests/test_slurm.py starts a real cluster),
#   iproute2 + util-linux (ip netns, nsenter, unshare: the hosts of tests/test_multinode.py),
#   boto3 + moto in .venv (tests/test_launch_backends.py: the SageMaker request through moto).
# Without root the apt part is skipped and those tests skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have slurmctld && have slurmd && have sbatch || missing+=(slurm-wlm)
have munged || missing+=(munge)
have ip || missing+=(iproute2)
have nsenter && have unshare || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "ci_services: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "ci_services: not root, cannot install ${missing[*]}; those tests will skip" >&2
  fi
fi

if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import boto3, botocore, moto" 2>/dev/null; then
  echo "ci_services: pip install boto3 moto" >&2
  .venv/bin/pip install -q --disable-pip-version-check "boto3>=1.34,<2" "moto[server]==5.2.5"
fi
