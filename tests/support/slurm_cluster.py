"""A real two-node SLURM cluster on this one machine, for tests (tests/integration/test_cluster.py).

Debian's ``slurm-wlm`` and ``munge``: one ``munged``, one ``slurmctld`` and two ``slurmd`` (nodes ``n1`` and
``n2``, both this machine), every file in one scratch folder: munge key, socket, pid and log files, slurm.conf,
state, spool and logs. Nothing outside it is touched except the packages, installed with apt-get only where
``sbatch`` is missing. The nodes' ``NodeAddr`` is 127.0.0.1, so their names need not resolve (no /etc/hosts
entry); the ports are picked free, so two clusters (two test sessions) can run side by side. The daemons
are stopped by the PIDs in their pid files, never by name.

By hand (the same cluster, e.g. to try ``launch/slurm.sbatch``)::

    python -m tests.slurm_cluster start /tmp/slurm    # prints the export SLURM_CONF=... line
    python -m tests.slurm_cluster stop /tmp/slurm
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
COMMANDS = ["sbatch", "srun", "scontrol", "sinfo", "scancel", "slurmctld", "slurmd", "munged"]
NODES = ["n1", "n2"]
# Minimum 5 s (slurm_cred.c); it is also how long SLURM holds a requeued job back before it may start again
# (begin time = now + cred_expire + 1), 120 s by default.
CRED_EXPIRE_S = 10
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")

SLURM_CONF = """\
# A two-node test cluster on one machine (tests/support/slurm_cluster.py); every path is under {dir}.
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket,cred_expire={cred_expire}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmdSpoolDir={dir}/spool/%n
StateSaveLocation={dir}/state
SlurmctldLogFile={dir}/log/ctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
SlurmUser=root
SchedulerType=sched/backfill
# Schedule every 2 s: a requeued job starts as soon as its hold ends, not at the next 60 s pass.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port1} CPUs=2 RealMemory=10000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port2} CPUs=2 RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class ClusterUnavailable(Exception):
    """SLURM cannot be installed or started here (the reason says why)."""


def ensure_installed(timeout_s: float = 900) -> None:
    """Install slurm-wlm and munge with apt-get if a SLURM command is missing (root only, about a minute)."""
    if all(shutil.which(c) for c in COMMANDS):
        return
    missing = [c for c in COMMANDS if not shutil.which(c)]
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and installing it needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt run (a parallel session) holds the lock: wait for it
    for cmd in (["apt-get", *lock, "update", "-q"], ["apt-get", *lock, "install", "-y", "-q", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` took over {timeout_s:.0f}s") from None
        if proc.returncode != 0:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")
    still = [c for c in COMMANDS if not shutil.which(c)]
    if still:
        raise ClusterUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(still)} still missing")


class LocalSlurm:
    """The cluster in ``root``: ``start()``, ``stop()``, and the client commands with its ``SLURM_CONF``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.jobs: list[int] = []  # submitted through sbatch(): cancelled by stop() if still there

    # -- daemons -------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root to start jobs as the submitting user")
        ensure_installed()
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)  # munged refuses a socket or key folder others can write to
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        self.conf.write_text(SLURM_CONF.format(dir=self.root, ctld_port=free_port(), port1=free_port(), port2=free_port(),
                                               cred_expire=CRED_EXPIRE_S))
        m = self.root / "munge"
        self._daemon(["munged", "--force", f"--socket={m}/munge.socket", f"--key-file={key}", f"--pid-file={m}/munged.pid",
                      f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], m / "munged.pid", "munged")
        self._daemon(["slurmctld", "-f", str(self.conf)], self.root / "slurmctld.pid", "slurmctld")
        for node in NODES:
            self._daemon(["slurmd", "-f", str(self.conf), "-N", node], self.root / f"slurmd-{node}.pid", f"slurmd {node}")
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            states = out.stdout.strip()
            if sorted(states.split("\n")) == [f"{n} idle" for n in NODES]:
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"the nodes were not both idle within {timeout_s:.0f}s (sinfo: {states!r}); "
                                 f"logs in {self.root / 'log'}:\n{self.logs()}")

    def _daemon(self, cmd: list[str], pid_file: Path, name: str, timeout_s: float = 20) -> None:
        """Start a daemon (it forks into the background) and wait for its pid file."""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=self.env())
        deadline = time.monotonic() + timeout_s
        while not _pid(pid_file) and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.returncode != 0 or not _pid(pid_file):
            raise ClusterUnavailable(f"{name} did not start ({proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}\n"
                                     f"{self.logs()}")

    def stop(self, timeout_s: float = 30) -> None:
        """Cancel the jobs still queued or running (their processes would outlive slurmd), then stop every
        daemon by the PID in its pid file (slurmd, slurmctld, then munged)."""
        active = [j for j in self.jobs if self.job(j).get("JobState") not in (None, *ENDED)] if self.conf.exists() else []
        for job in active:
            self.run(["scancel", str(job)], check=False)
        deadline = time.monotonic() + 90  # KillWait (30 s) and the ranks' checkpoint
        while active and time.monotonic() < deadline:
            active = [j for j in active if self.job(j).get("JobState") not in (None, *ENDED)]
            time.sleep(1)
        files = [self.root / f"slurmd-{n}.pid" for n in NODES] + [self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        for f in files:
            pid = _pid(f)
            if pid and _is(pid, ("slurmd", "slurmctld", "munged")):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout_s
                while _is(pid, ("slurmd", "slurmctld", "munged")) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _is(pid, ("slurmd", "slurmctld", "munged")):
                    os.kill(pid, signal.SIGKILL)

    def logs(self, tail: int = 4000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- clients -------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf), **(extra or {}))

    def run(self, cmd: list[str], check: bool = True, timeout_s: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=kw.pop("env", self.env()), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd).stdout.strip()
        self.jobs.append(int(out.split(";")[0]))
        return self.jobs[-1]

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, StdOut, ...); {} once it is gone."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: int, states: set[str], timeout_s: float, poll_s: float = 1.0) -> dict[str, str]:
        """Wait until the job is in one of ``states``; AssertionError with its last record after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll_s)
        raise AssertionError(f"job {job_id} not in {sorted(states)} within {timeout_s:.0f}s: {info}")


def free_port() -> int:
    """A TCP port free right now (as tests.helpers.free_port, without importing torch: the CLI stays quick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is(pid: int, names: tuple[str, ...]) -> bool:
    """The process ``pid`` is alive (not a zombie) and one of the daemons (a recycled PID is left alone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1: stat.rindex(")")], stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and comm in names


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        sys.exit("usage: python -m tests.slurm_cluster start|stop DIR")
    cluster = LocalSlurm(Path(argv[1]).resolve())
    if argv[0] == "start":
        try:
            cluster.start()
        except ClusterUnavailable as err:
            cluster.stop()
            sys.exit(f"error: {err}")
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
