"""Run a command on a loaded machine: N busy-looping processes (default 2x the cores) beside it.

    python3 scripts/busy.py -- bash scripts/test.sh          # the suite at load ~3x the cores
    python3 scripts/busy.py --procs 4 -- .venv/bin/python -m pytest tests/test_multinode.py

The suite must pass so (rendezvous, store and collective waits are generous; docs/benchmarks.md).
The load stops when the command ends (or on Ctrl-C); the exit status is the command's. Plain
Python, nothing to install (`stress-ng --cpu N` does the same where it is installed).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys


def spin() -> None:
    while True:
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2 * (os.cpu_count() or 1))
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd or a.procs < 0:
        p.error("give --procs >= 0 and a command after --")
    spinners = [mp.get_context("fork").Process(target=spin, daemon=True) for _ in range(a.procs)]
    for s in spinners:
        s.start()
    print(f"busy.py: {a.procs} busy processes; load {os.getloadavg()}", file=sys.stderr)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
    finally:
        print(f"busy.py: done; load {os.getloadavg()}", file=sys.stderr)
        for s in spinners:
            s.kill()
            s.join()


if __name__ == "__main__":
    sys.exit(main())
