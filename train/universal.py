"""Resume a checkpoint whose optimizer state is partitioned by the world size (ZeRO stage 1/2, or DeepSpeed's
bf16 optimizer, which partitions its fp32 master weights even at stage 0) on another number of processes.

DeepSpeed's universal checkpoint does the work: ``deepspeed.checkpoint.ds_to_universal`` merges every rank's
partition into one file per parameter (fp32 weights, Adam moments, step) and the engine, told to load a
universal checkpoint, cuts them again for the new world. We run the conversion once, on rank 0, into a
scratch folder beside the checkpoints (removed once every rank has loaded), so the checkpoint itself is never
changed. The converter unpickles the checkpoint's files without ``weights_only``: their globals are checked
against the allow-list of train/checkpointing.py first, so a crafted file is refused before it is read.

DeepSpeed's native MoE layers are not covered (DeepSpeed issue #5716: the converter knows only its AutoEP
experts), so this path serves the local MoE backend; checkpoints with DeepSpeed MoE layers go through our own
merge of the partitions instead (train/zero_merge.py, train/relayout.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from model import distributed as D
from train.checkpointing import check_safe_to_unpickle, load_rng

SCRATCH = "universal-tmp"  # beside the run's checkpoints folder, never inside it (remove_incomplete would take it)


class UniversalError(RuntimeError):
    """DeepSpeed could not convert or load the checkpoint as a universal checkpoint; the message says why."""


def partitioned_files(folder: Path) -> list[Path]:
    """The checkpoint's per-rank optimizer partitions (ZeRO ``zero_pp_rank_*``, bf16 ``bf16_zero_pp_rank_*``)."""
    return sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"))


def _convert(folder: Path, out: Path) -> float:
    """Rank 0: ds_to_universal of ``folder`` into ``out`` (one process, no worker pools); returns its seconds."""
    for path in sorted(folder.glob("*.pt")):
        check_safe_to_unpickle(path)
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # our checkpoints carry no Megatron-style universal_checkpoint_info
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        raise UniversalError(f"DeepSpeed's ds_to_universal could not convert {folder}: {last[0][:300]}")
    return time.perf_counter() - started


def load_universal(engine, folder: Path, scratch_root: Path) -> str:
    """Load ``folder`` (partitioned for another world size) into ``engine`` through a universal checkpoint:
    weights, fp32 master weights, Adam moments and steps, schedule, step counters; the RNG of each rank that
    the checkpoint had. Collective. Returns what was done, in words."""
    out = scratch_root / SCRATCH / folder.name
    seconds, error = 0.0, None
    if D.is_main():
        try:
            seconds = _convert(folder, out)
        except (UniversalError, ValueError, OSError) as err:
            error = str(err)
    error = D.from_main(error)
    if error:
        raise UniversalError(error)
    config = engine._config  # DeepSpeed reads this flag at load time only (engine.load_universal_checkpoint())
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(out.parent), tag=out.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise UniversalError(f"DeepSpeed could not load the universal conversion of {folder}")
    load_rng(folder)
    D.barrier()
    if D.is_main():
        shutil.rmtree(out.parent, ignore_errors=True)
    return (f"optimizer partitions of {len(partitioned_files(folder))} processes re-cut for {D.world()} through "
            f"DeepSpeed's universal checkpoint (converted in {seconds:.1f}s)")
