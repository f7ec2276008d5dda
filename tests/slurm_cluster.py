"""A real Slurm cluster on one machine, for tests: munged + slurmctld + one slurmd per host.

Debian's slurm-wlm and munge (scripts/ci_services.sh installs them). Every daemon runs in the
foreground as a child of the test, in a private folder; slurmctld in the login namespace of a
tests.netns_hosts.HostNetwork and each slurmd in its host's namespace, under the host's own
hostname, so a job's nodes really are different hosts with different addresses. Commands (sbatch,
scontrol, `triaxis launch --backend slurm`) run in the login namespace with SLURM_CONF set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.netns_hosts import HostNetwork

STALE = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def unavailable_reason() -> str | None:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    return f"{', '.join(missing)} missing: run scripts/ci_services.sh" if missing else None


class SlurmCluster:
    def __init__(self, net: HostNetwork, cpus_per_node: int = 2):
        self.net = net
        self.cpus = cpus_per_node
        # munged refuses a socket folder that others cannot enter: 0755, not mkdtemp's 0700.
        self.dir = Path(tempfile.mkdtemp(prefix="txslurm"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        # Jobs find their rendezvous and interfaces themselves: no stale values from outside.
        self.env = {k: v for k, v in os.environ.items() if k not in STALE}
        self.env["SLURM_CONF"] = str(self.conf)
        self.procs: list[subprocess.Popen] = []

    def _write_conf(self) -> None:
        d, login = self.dir, self.net.login
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        lines = [
            "ClusterName=triaxistest",
            f"SlurmctldHost=login({login.address})",
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={d}/munge.socket",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "SlurmdTimeout=60",
            "JobRequeue=1",
            "MinJobAge=600",
            "KillWait=5",
            "MailProg=/bin/true",
        ]
        for h in self.net.hosts:
            lines.append(
                f"NodeName={h.name} NodeAddr={h.address} NodeHostname={h.name} "
                f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            )
        lines.append("PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, argv: list[str], log: str) -> None:
        out = open(self.dir / log, "ab")
        self.procs.append(
            subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        )

    def start(self, timeout_s: float = 30) -> None:
        d = self.dir
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_conf()
        self._spawn(
            [
                "munged",
                "-F",
                "--force",
                f"--socket={d}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={d}/munged.pid",
                f"--log-file={d}/munged.log",
                f"--seed-file={d}/munged.seed",
            ],
            "munged.out",
        )
        self._wait(lambda: (d / "munge.socket").exists(), 10, "munged")
        # slurmctld runs only on a host whose name is SlurmctldHost's.
        self._spawn(
            self.net.login.prefix() + ["slurmctld", "-D", "-c", "-f", str(self.conf)],
            "slurmctld.out",
        )
        for h in self.net.hosts:
            self._spawn(
                h.prefix() + ["slurmd", "-D", "-f", str(self.conf), "-N", h.name],
                f"slurmd-{h.name}.out",
            )
        want = len(self.net.hosts)
        self._wait(
            lambda: (
                self.run(["sinfo", "-h", "-o", "%T %D"], check=False).stdout.split()
                == ["idle", str(want)]
            ),
            timeout_s,
            "the Slurm nodes (sinfo idle)",
        )

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} not ready within {timeout_s} s; logs in {self.dir}:\n{self.logs()}"
                )
            time.sleep(0.2)

    def run(
        self, argv: list[str], check: bool = True, timeout: float = 120, **kw
    ) -> subprocess.CompletedProcess:
        """Run a command on the login node."""
        proc = subprocess.run(
            self.net.login.prefix(own_hostname=False) + argv,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and proc.returncode:
            raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return proc

    def job_field(self, job_id: str, name: str) -> str:
        out = self.run(["scontrol", "show", "job", job_id], check=False).stdout
        for word in out.split():
            if word.startswith(f"{name}="):
                return word.split("=", 1)[1]
        return ""

    def wait_job(self, job_id: str, states: set[str], timeout_s: float) -> str:
        state = ""

        def done() -> bool:
            nonlocal state
            state = self.job_field(job_id, "JobState")
            return state in states

        self._wait(done, timeout_s, f"job {job_id} in {states} (last state {state!r})")
        return state

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
            for p in sorted(self.dir.glob("*.log"))
        )

    def stop(self) -> None:
        if self.procs:  # end this cluster's jobs (and their processes) before its daemons
            self.run(["scancel", "--user=root"], check=False, timeout=30)
            time.sleep(1)
        for p in reversed(self.procs):  # only the daemons this cluster started
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
