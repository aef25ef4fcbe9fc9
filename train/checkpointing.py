"""Resumable checkpoints: DeepSpeed's engine state plus what continues the run exactly.

Layout: ``<run>/checkpoints/step-000120/`` holds DeepSpeed's files (model, optimizer, scheduler,
written by ``engine.save_checkpoint``), ``rng-rank<r>.pt`` per rank, and last of all
``complete.json`` (trainer state: data position, step, best-so-far, W&B id), written atomically
by rank 0 after every rank has finished writing. A folder without ``complete.json`` is a
checkpoint that was being written when the process died: never resumed from, and removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train import distributed as D

COMPLETE = "complete.json"


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def latest_complete(ckpt_dir: Path) -> Path | None:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_rng(folder: Path) -> None:
    s = rng_state()
    np_state = s["numpy"]
    payload = {
        "torch": s["torch"],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.float64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(list(s["python"][1]), dtype=torch.int64),
        "python_version": torch.tensor([s["python"][0]], dtype=torch.int64),
    }
    if "cuda" in s:
        payload["cuda"] = s["cuda"]
    torch.save(payload, folder / f"rng-rank{D.rank()}.pt")


def load_rng(folder: Path) -> None:
    path = folder / f"rng-rank{D.rank()}.pt"
    if not path.is_file():
        return  # resumed with more ranks than saved: those ranks keep their fresh seeds
    p = torch.load(path, weights_only=True)  # our own tensors only
    torch.set_rng_state(p["torch"])
    np.random.set_state(("MT19937", p["numpy_keys"].numpy().astype(np.uint32), int(p["numpy_meta"][0]),
                         int(p["numpy_meta"][1]), float(p["numpy_gauss"][0])))
    random.setstate((int(p["python_version"][0]), tuple(int(x) for x in p["python"].tolist()), None))
    if "cuda" in p and torch.cuda.is_available():
        torch.cuda.set_rng_state(p["cuda"])


def save(engine, ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save a complete, resumable checkpoint (collective: every rank calls it)."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if D.is_main() and folder.exists():
        shutil.rmtree(folder)  # a stale incomplete folder from a killed run at the same step
    D.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    save_rng(folder)
    D.barrier()
    _test_hook("MMOE_TEST_KILL_DURING_SAVE", step)
    if D.is_main():
        tmp = folder / (COMPLETE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, folder / COMPLETE)
        for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return folder


def load(engine, folder: Path) -> dict[str, Any]:
    """Restore engine (model, optimizer, scheduler), RNG and return the trainer state."""
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
    load_rng(folder)
    return json.loads((folder / COMPLETE).read_text())


def remove_incomplete(ckpt_dir: Path) -> list[Path]:
    """Delete checkpoint folders whose writing never finished (rank 0)."""
    removed = []
    if D.is_main() and ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.is_dir() and not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    D.barrier()
    return removed


def _test_hook(name: str, step: int) -> None:
    """Fault injection for the resume tests: SIGKILL this process at a given step."""
    if os.environ.get(name) == str(step):
        os.kill(os.getpid(), 9)
