"""One run per run folder, and nothing of anyone else's destroyed.

- **The lock.** ``runs/NAME/.lock`` holds the owner (host, PID, the process's start time, when it took the
  lock), created with an atomic link so two trainers cannot both take it. Rank 0 holds it for the run's life
  and removes it at the end. A second trainer on the folder stops at once, naming the holder. A lock left by
  a dead process on this host (killed, or its node rebooted) is taken over with a message; a lock from
  another host cannot be checked from here and needs ``--break-lock``. The same lock keeps a re-queued
  cluster job from racing the ranks of its predecessor.
- **A fresh start** needs an empty (or absent) folder. A folder holding anything else is refused, naming
  what is there; ``--overwrite`` moves those contents aside to ``NAME.replaced-<time>/`` first. What a run
  that never trained left (``run.json``, its config, no metrics rows) counts as empty. A folder this project
  made for a run that never finished a checkpoint (marked by ``run.json``) may be started afresh by
  ``--resume auto`` unless it holds what a trained run leaves (``best/``, results).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

LOCK = ".lock"
MARKER = "run.json"  # written at the start of every run: this folder is a run folder of this project


class RunFolderError(RuntimeError):
    """The run folder is held by another run, or holds files a fresh start would destroy."""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(owner: dict) -> bool:
    """Whether the lock's owner (a process on this host) still runs: same PID and the same start time."""
    ticks = _start_time(int(owner.get("pid", -1)))
    return ticks is not None and (owner.get("start_ticks") is None or ticks == owner["start_ticks"])


def _describe(owner: dict) -> str:
    return f"PID {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"


class RunFolderLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.held = False

    def acquire(self, break_lock: bool = False) -> str | None:
        """Take the lock (rank 0). Returns a message when a stale lock was taken over; raises RunFolderError
        when another live run (or one on another host, without ``break_lock``) holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = _me()
        note = None
        for _ in range(3):  # a takeover raced by another trainer: try again, it then holds the lock
            tmp = self.path.with_name(f"{LOCK}.{mine['pid']}.tmp")
            tmp.write_text(json.dumps(mine))
            try:
                os.link(tmp, self.path)  # atomic: fails when the lock exists
                self.held = True
                return note
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            owner = self._owner()
            if owner is None:
                continue  # released (or unreadable and removed) in between
            here = owner.get("host") == mine["host"]
            if here and _alive(owner):
                raise RunFolderError(f"{self.path.parent} is in use by another run ({_describe(owner)}): wait for it "
                                     "to end, stop it, or choose another train.run_name")
            if not here and not break_lock:
                raise RunFolderError(f"{self.path.parent} is locked by a run on another host ({_describe(owner)}); "
                                     "if no process of that run is alive any more (e.g. its node was lost), pass "
                                     "--break-lock to take the folder over")
            note = (f"took over the lock of {self.path.parent} from "
                    f"{'a dead process' if here else 'a run on another host (--break-lock)'}: {_describe(owner)}")
            try:
                os.rename(self.path, self.path.with_name(f"{LOCK}.stale-{mine['pid']}"))  # only one taker wins
                self.path.with_name(f"{LOCK}.stale-{mine['pid']}").unlink()
            except FileNotFoundError:
                pass
        raise RunFolderError(f"could not take the lock {self.path}: other trainers keep taking it")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "since": "? (unreadable lock file)"}

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if self.held and (self._owner() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def foreign_contents(run_dir: Path) -> list[str]:
    """What a fresh start would destroy: every entry of the folder but the lock."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if not p.name.startswith(LOCK))


# What a run that never trained leaves (refused at its start, or killed before its first step): its folder counts
# as empty for a fresh run. metrics.jsonl only without rows, checkpoints/ only empty (the grace write probe's).
UNTRAINED = (MARKER, "config.yaml", "metrics.jsonl", "checkpoints/")
# What a trained run leaves besides checkpoints (train/trainer.py; eval/evaluate.py write_outputs): --resume auto
# that finds no checkpoint must not start afresh over them.
_TRAINED = re.compile(r"best(\.old|\.tmp)?/|results-.+\.json|per_mention-.+\.jsonl|leaderboard-.+\.md")


def never_trained(run_dir: Path, there: list[str]) -> bool:
    """Whether ``there`` (the folder's contents) is only what a run of this project that never trained wrote."""
    if MARKER not in there or any(name not in UNTRAINED for name in there):
        return False
    metrics, checkpoints = run_dir / "metrics.jsonl", run_dir / "checkpoints"
    return (not metrics.is_file() or not metrics.read_text(errors="replace").strip()) and (
        not checkpoints.is_dir() or not any(checkpoints.iterdir()))


def prepare_fresh(run_dir: Path, resume: str, overwrite: bool) -> str | None:
    """Rank 0, before a run that loads no checkpoint: refuse a folder with contents (RunFolderError), or move
    them aside with ``overwrite``; returns a message saying so. ``resume`` is ``none`` or ``auto`` (auto found
    no checkpoint: a folder this project made, marked, may be restarted while it holds nothing a trained run
    leaves, e.g. a run killed before its first checkpoint)."""
    there = foreign_contents(run_dir)
    if not there or never_trained(run_dir, there):
        return None
    if resume == "auto" and (run_dir / MARKER).is_file() and not overwrite:
        trained = [name for name in there if _TRAINED.fullmatch(name)]
        if not trained:
            return None
        raise RunFolderError(f"{run_dir} holds a trained run ({_shown(trained)}) but no complete checkpoint to continue: "
                             "a fresh run would overwrite it. Choose another train.run_name, or pass --overwrite to "
                             f"move its contents aside to {run_dir.name}.replaced-<time>/")
    if not overwrite:
        raise RunFolderError(f"{run_dir} is not empty ({_shown(there)}): a fresh run would overwrite it. Pass --resume auto to "
                             "continue the run there, choose another train.run_name, or pass --overwrite to move its "
                             f"contents aside to {run_dir.name}.replaced-<time>/")
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    for name in there:
        os.rename(run_dir / name.rstrip("/"), aside / name.rstrip("/"))
    return f"--overwrite: moved the earlier contents of {run_dir} to {aside}"


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def mark(run_dir: Path, run_name: str) -> None:
    """This folder is a run folder of this project (rank 0, once the run has started)."""
    path = run_dir / MARKER
    if not path.is_file():
        path.write_text(json.dumps({"run_name": run_name, "created": time.strftime("%Y-%m-%d %H:%M:%S")}))
