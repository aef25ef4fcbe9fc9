"""Preemption: a scheduler's stop signal becomes a checkpoint at the next optimizer step and a distinct exit.

Every rank installs handlers for ``train.stop_signals`` (SIGTERM and SIGUSR1 by default) that only note
the signal. At each optimizer-step boundary the ranks already all-reduce one flag (the bad-step guard);
the stop request rides in the same reduction, so all ranks agree on the same step, finish it, write a
complete checkpoint and exit with ``PREEMPTED_EXIT_CODE`` (75, EX_TEMPFAIL: "try again"); rank 0 leaves
``<run>/preempted.json`` saying where. ``--resume auto`` continues from that checkpoint with no step lost.

Launchers in between: the deepspeed launcher, on SIGTERM or SIGINT, sends SIGTERM to its whole process
tree (ranks and DataLoader workers) and SIGKILL 30 s later; torchrun's agent sends SIGTERM to its workers.
The grace a job needs (one step plus one checkpoint) is printed at start. A rank whose launcher dies
(``kill`` of the ``deepspeed`` command alone would otherwise leave the ranks training, racing the next
job) treats that as a stop request too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from core import faults
from core.atomic import write_text_atomic
from eval.encode import Interrupted
from model import distributed as D
from train.observe import RankLog
from train.step_guard import agree

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL
PREEMPTED_FILE = "preempted.json"
LAUNCHER_GONE = 1000  # stop code for "a launcher process above this rank died" (signal numbers are < 100)
_LAUNCHER_PROGRAMS = ("deepspeed", "torchrun")  # launcher scripts, by file name
_LAUNCHER_MODULES = ("deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch")  # python -m ...


class Preempted(Exception):
    """Training stopped on a stop request after writing a complete checkpoint."""

    def __init__(self, step: int, reason: str, checkpoint: Path) -> None:
        super().__init__(f"preempted ({reason}) at step {step}: complete checkpoint {checkpoint}; "
                         f"continue with --resume auto (exit code {PREEMPTED_EXIT_CODE})")
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


def describe(code: int) -> str:
    """The stop code agreed by the ranks, in words."""
    if code >= LAUNCHER_GONE:
        return "a launcher process died"
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def _is_launcher(pid: int) -> bool:
    """By the first words of its command line (``python -u -m deepspeed.launcher.launch ...``, ``.../bin/deepspeed``,
    ``torchrun``), so that a script merely given launcher options as arguments is not taken for one."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:4]
    except OSError:
        return False
    return any(Path(a).name in _LAUNCHER_PROGRAMS or a in _LAUNCHER_MODULES for a in argv)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, parent, ...); [] for no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped (os.kill(pid, 0) succeeds on zombies)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def launcher_ancestors(pid: int | None = None) -> list[int]:
    """The chain of launcher processes above this one (deepspeed runner and per-node launcher,
    torchrun), nearest first; stops at the first ancestor that is not a launcher (a shell, pytest,
    srun), so a plain ``python launch/train.py`` watches nothing."""
    chain, pid = [], os.getppid() if pid is None else pid
    while pid > 1 and _is_launcher(pid):
        chain.append(pid)
        pid = _parent(pid)
    return chain


class StopRequests:
    """This rank's stop request: a received stop signal, or a dead launcher above it."""

    def __init__(self, names: list[str]) -> None:
        self.signals = [signal.Signals[n] for n in names]
        self.code = 0  # the first stop signal received (its number), 0 = none
        self.received_at: float | None = None
        self.watched = launcher_ancestors()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Install the handlers (main thread only). Forked DataLoader workers inherit them, so a
        launcher's SIGTERM to the whole tree does not kill a worker under a rank that is finishing."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if not self.code:
            self.code, self.received_at = signum, time.monotonic()

    def local_code(self) -> int:
        """This rank's stop code: the signal number, LAUNCHER_GONE, or 0."""
        if not self.code and self.watched and not all(_alive(p) for p in self.watched):
            self.code, self.received_at = LAUNCHER_GONE, time.monotonic()
        return self.code

    def names(self) -> str:
        return "/".join(s.name for s in self.signals)


def write_record(run_dir: Path, step: int, reason: str, checkpoint: Path, seconds: float | None) -> None:
    """``<run>/preempted.json``: what a job script reads to decide to re-queue (rank 0)."""
    record = {"step": step, "signal": reason, "checkpoint": str(checkpoint), "exit_code": PREEMPTED_EXIT_CODE,
              "signal_to_checkpoint_s": None if seconds is None else round(seconds, 3), "time": time.time()}
    write_text_atomic(run_dir / PREEMPTED_FILE, json.dumps(record, indent=1))


def clear_record(run_dir: Path) -> None:
    """A new attempt starts: an earlier attempt's record no longer describes the run."""
    (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)


def write_rate_mb_s(folder: Path, size_mb: int = 32) -> float | None:
    """The write rate of ``folder`` (written and fsynced, then removed): the grace estimate's basis. The probe
    takes at most an eighth of the free space; None when the disk has no room for it."""
    folder.mkdir(parents=True, exist_ok=True)
    size_mb = min(size_mb, shutil.disk_usage(folder).free // (8 << 20))
    if size_mb < 1:
        return None
    probe = folder / f".write-probe-{os.getpid()}"
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    try:
        with open(probe, "wb") as fh:
            for _ in range(size_mb):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        return size_mb / max(time.perf_counter() - start, 1e-6)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        return None
    finally:
        probe.unlink(missing_ok=True)


class Preemption:
    """A stop request as every rank agrees on it: the agreed stop code (``code``, 0: none; set at each step
    boundary by the step's agreement, and at the check points of an evaluation or of mining), the grace a
    scheduler must allow, and the record and ``Preempted`` that end a stopped run."""

    def __init__(self, stops: StopRequests, run_dir: Path, device: torch.device, console: RankLog) -> None:
        self.stops, self.run_dir, self.device, self.console = stops, run_dir, device, console
        self.code = 0  # a stop request agreed by every rank at the last step boundary

    def announce_grace(self, resumed: dict | None, module: torch.nn.Module) -> None:
        """How long a stop signal needs before the scheduler's kill: one step plus one checkpoint, the
        checkpoint from the resumed one's record or estimated from the state size and a write probe."""
        names = self.stops.names()
        if not D.is_main():
            return
        if resumed is not None and "save_s" in resumed:
            cost = f"the checkpoint resumed from took {resumed['save_s']:.2f}s to write"
        else:
            n_bytes = 3 * sum(p.numel() * p.element_size() for p in module.parameters())  # weights, 2 moments
            rate = write_rate_mb_s(self.run_dir)
            cost = f"a checkpoint holds about {n_bytes / 2**20:.1f} MiB per rank, " + (
                f"about {n_bytes / 2**20 / rate:.2f}s at the {rate:.0f} MiB/s measured here" if rate else
                f"but the run folder's disk has only {shutil.disk_usage(self.run_dir).free / 2**20:.0f} MiB free")
        self.console.info(f"[preemption] {names}: every rank stops at the next optimizer step, writes a checkpoint and "
                          f"exits {PREEMPTED_EXIT_CODE}; {cost}; allow that plus one step (SLURM: #SBATCH --signal)")

    def requested(self, step: int) -> bool:
        """Collective, at the check points of an evaluation or of mining: whether any rank was asked to stop
        (the stop code is kept, as at a step boundary). A long evaluation would outlast the grace a scheduler
        gives between its stop signal and its kill, with this step's checkpoint not yet written."""
        if D.is_main():
            faults.signal_point("SIGNAL_IN_EVAL", step)  # tests: a signal mid-way
        _, code = agree(True, self.stops.local_code(), self.device)
        self.code = self.code or code
        return code != 0

    def stopped_during(self, what: str, where: Interrupted) -> None:
        self.console.warn(f"[preemption] {describe(self.code)} during {what} ({where}): it is left for the "
                          "resumed run")

    def preempt(self, step: int, folder: Path) -> None:
        """The ranks agreed to stop after ``step``, whose complete checkpoint is ``folder``: the record, then
        Preempted."""
        reason = describe(self.code)
        waited = time.monotonic() - self.stops.received_at if self.stops.received_at is not None else None
        if D.is_main():
            write_record(self.run_dir, step, reason, folder, waited)
        D.barrier()
        self.console.warn(f"[preemption] {reason}: stopped after step {step}, complete checkpoint {folder}; exiting "
                          f"with {PREEMPTED_EXIT_CODE} (continue with --resume auto)")
        raise Preempted(step, reason, folder)
