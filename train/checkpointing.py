"""Resumable checkpoints: DeepSpeed's engine state plus what continues the run exactly.

Layout: ``<run>/checkpoints/step-000120/`` holds DeepSpeed's files (model, optimizer, scheduler,
written by ``engine.save_checkpoint``; with the DeepSpeed MoE backend also one file per expert,
``layer_{l}_expert_{e}_mp_rank_00_model_states.pt`` with global expert ids, and the optimizer
state per expert-parallel rank), ``rng-rank<r>.pt`` per rank, ``moe-layout.json`` (backend,
ep_size, experts), and last of all ``complete.json`` (trainer state: data position, step,
best-so-far, W&B id, the shards manifest's sha256, the size and sha256 of every other file of the
folder), written atomically by rank 0 after every rank has finished writing. A folder without
``complete.json`` is a checkpoint that was being written when the process died: never resumed
from, and removed. A complete folder whose files no longer match their record (truncated, garbled,
missing) is damaged: ``--resume auto`` falls back to the previous complete checkpoint.

A checkpoint resumes on another number of processes (the interrupted epoch is re-planned) and on
another MoE layout, backend or ep_size, optimizer state included (train/relayout.py, which reads
``optim-params-rank<r>.json``: the parameter behind each optimizer-state index). Any checkpoint
also converts to a one-process export in the local layout (for eval.evaluate)::

    python -m train.checkpointing export runs/NAME/checkpoints/step-0000120 OUT [--config runs/NAME/config.yaml]
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import pickle
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import faults
from core.atomic import write_text_atomic
from core.cli import disk_full, disk_full_line
from core.hashing import file_sha256
from model import distributed as D
from model.config import Config, load_config, to_dict
from model.export import export_config, save_export
from model.mmoe import MMoEModel
from moe.expert_parallel import moe_layout

COMPLETE = "complete.json"
MOE_LAYOUT = "moe-layout.json"
WRITTEN_BY_US = ".mmoe-checkpoint"  # written first into every checkpoint folder: cleanup removes only these


class MoELayoutMismatch(RuntimeError):
    """The checkpoint's experts are laid out for another MoE backend or ep_size."""


def check_moe_layout(folder: Path, module: nn.Module) -> None:
    path = folder / MOE_LAYOUT
    if not path.is_file():
        return  # written before the layout was recorded
    saved, now = json.loads(path.read_text()), moe_layout(module)
    if saved != now:
        def show(x: dict) -> str:
            return f"backend={x['backend']}, ep_size={x['ep_size']}, {x['num_experts']} experts per layer"

        raise MoELayoutMismatch(
            f"checkpoint {folder} holds its experts as {show(saved)}; this run has {show(now)}. Resume with "
            f"--set model.matcher.moe.backend={saved['backend']} --set model.matcher.moe.ep_size={saved['ep_size']} "
            "(the optimizer state is sharded by that layout), or convert the checkpoint to a one-process export "
            f"in the local layout: python -m train.checkpointing export {folder} OUT")


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_folder(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / tag_for(step)


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


def save(engine, ckpt_dir: Path, step: int, state: dict[str, Any], keep: int, write_extra=None) -> Path:
    """Save a complete, resumable checkpoint (collective: every rank calls it). ``write_extra(folder)``, called
    on every rank after DeepSpeed's files, adds files of ours (recorded and verified like the others)."""
    started = time.perf_counter()
    final = ckpt_dir / tag_for(step)
    # A complete checkpoint of this step already there (the run resumed from it) stays until its successor is
    # complete: the new one is written beside it and takes its name only then.
    rewrite = (final / COMPLETE).is_file()
    tag = tag_for(step) + ("-rewrite" if rewrite else "")
    folder = ckpt_dir / tag
    if D.is_main():
        if folder.exists():
            if not (folder / WRITTEN_BY_US).is_file():
                raise RuntimeError(f"{folder} exists and was not written by this project's trainer: move it away")
            shutil.rmtree(folder)  # a stale incomplete folder from a killed run at the same step
        folder.mkdir(parents=True)
        (folder / WRITTEN_BY_US).write_text("a checkpoint folder written by MMoE's trainer (train/checkpointing.py)\n")
    D.barrier()
    try:
        _write_files(engine, ckpt_dir, tag, write_extra)
        D.barrier()
        faults.kill_point("KILL_DURING_SAVE", step)
        if D.is_main():
            state = {**state, "files": file_record(folder),  # what load() verifies before trusting the folder
                     "save_s": round(time.perf_counter() - started, 3)}  # the grace a stop needs (train/preemption.py)
            write_text_atomic(folder / COMPLETE, json.dumps(state, indent=1))
    except (OSError, RuntimeError) as err:
        if not disk_full(err):
            raise
        if D.is_main():
            shutil.rmtree(folder, ignore_errors=True)  # ours, incomplete: give the space back
        raise OSError(errno.ENOSPC, f"no space left on device while writing checkpoint {folder} (the partial folder "
                      "was removed; the earlier complete checkpoints are untouched)", str(folder)) from None
    if D.is_main():
        if rewrite:  # a crash in between leaves step-N-rewrite, complete, which sorts after step-N
            shutil.rmtree(final)
            os.rename(folder, final)
        for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def _write_files(engine, ckpt_dir: Path, tag: str, write_extra) -> None:
    """Every rank's files of the checkpoint: DeepSpeed's, the RNG, ours (``write_extra``), the MoE layout."""
    folder = ckpt_dir / tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    save_rng(folder)
    if write_extra is not None:
        write_extra(folder)
    if D.is_main():
        (folder / MOE_LAYOUT).write_text(json.dumps(moe_layout(engine.module)))
    if faults.enabled("DUMP_STATE"):  # tests: every rank's own weights, to compare ranks
        torch.save({k: v.detach().cpu() for k, v in engine.module.state_dict().items()}, folder / f"state-rank{D.rank()}.pt")


def file_record(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a checkpoint folder (all ranks' files: the folder is shared)."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(COMPLETE)}


def damage(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint (unreadable complete.json, a file missing, truncated or
    changed since it was written), or None. Checkpoints written before files were recorded pass.
    Rank 0 reads the files; every rank gets its answer (collective)."""
    return D.from_main(_damage(folder) if D.is_main() else None)


def _damage(folder: Path) -> str | None:
    try:
        recorded = json.loads((folder / COMPLETE).read_text()).get("files", {})
    except (OSError, ValueError) as err:
        return f"{COMPLETE} is unreadable ({err})"
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written"
        if file_sha256(path) != want["sha256"]:
            return f"{name} does not have the sha256 it was written with"
    return None


def load(engine, folder: Path) -> dict[str, Any]:
    """Restore engine (model, optimizer, scheduler), RNG and return the trainer state."""
    check_moe_layout(folder, engine.module)
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
    load_rng(folder)
    return json.loads((folder / COMPLETE).read_text())


def remove_incomplete(ckpt_dir: Path) -> tuple[list[Path], list[Path]]:
    """Delete checkpoint folders whose writing never finished (rank 0): only ``step-*`` folders this project
    marked when it began writing them. Returns (removed, left alone: other folders without complete.json)."""
    removed, left = [], []
    if D.is_main() and ckpt_dir.is_dir():
        for p in sorted(ckpt_dir.iterdir()):
            if not p.is_dir() or (p / COMPLETE).is_file():
                continue
            if p.name.startswith("step-") and (p / WRITTEN_BY_US).is_file():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            else:
                left.append(p)
    D.barrier()
    return removed, left


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would need more than tensors, containers and DeepSpeed's plain types to load."""


# Types DeepSpeed's checkpoint files may hold besides tensors, containers and numbers (its optimizer-state
# files do; its model-state files need none today). Plain data holders: unpickling them runs no code of theirs.
DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
                   "deepspeed.runtime.zero.config.ZeroStageEnum")


def check_safe_to_unpickle(path: Path) -> list[str]:
    """The globals a torch checkpoint file needs, read without unpickling it; refuses (UnsafeCheckpointError)
    one outside DEEPSPEED_TYPES, and an unreadable file (ValueError). For files that DeepSpeed's own tools
    then load without ``weights_only``."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, OSError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint file ({str(err).splitlines()[0][:160]})") from None
    unsafe = sorted(set(needed) - set(DEEPSPEED_TYPES))
    if unsafe:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs {', '.join(unsafe)}, outside the types a checkpoint holds (tensors, "
            f"containers, {', '.join(t.rsplit('.', 1)[1] for t in DEEPSPEED_TYPES)}); a crafted file can run code "
            "when unpickled")
    return needed


def load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a DeepSpeed checkpoint file, with DEEPSPEED_TYPES allowed.

    The file's globals are listed before anything is unpickled: one outside the allow-list (a crafted
    file reaching for ``os.system``, say) is refused with its name, as is an unreadable file."""
    needed = check_safe_to_unpickle(path)
    allowed = []
    for name in needed:  # imported only when the file needs them (DeepSpeed is a heavy import)
        module, _, attr = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler's own refusal: a second line of defence
        raise UnsafeCheckpointError(f"refusing to load {path}: {str(err).splitlines()[0][:300]}") from None
    except RuntimeError as err:
        raise ValueError(f"{path} is not a readable torch checkpoint file ({str(err).splitlines()[0][:160]})") from None


# Settings a resume keeps (saved in complete.json as "fixed"): the data plan's seed and make-up, and the model's
# shape and behaviour, every model.* key but these (a path may move between machines; the seed only initialises
# weights the checkpoint replaces; the MoE layout is converted).
FIXED_DATA = ("data.seed", "data.train_fraction_mode", "data.mention_desc", "data.entity_desc")
FREE_MODEL = ("model.clip_path", "model.towers.text_path", "model.towers.vision_path", "model.tiny_clip.seed",
              "model.matcher.moe.backend", "model.matcher.moe.ep_size")


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def fixed_settings(cfg: Config) -> dict:
    """The settings a resumed run must keep, flat (``section.key``: value)."""
    data = _flat(to_dict(cfg.data), "data.")
    model = {k: v for k, v in _flat(to_dict(cfg.model), "model.").items() if k not in FREE_MODEL}
    return {**{k: data[k] for k in FIXED_DATA}, **model}


def changed_settings(saved: dict, now: dict) -> list[str]:
    """``key old -> new`` for each of the ``saved`` fixed settings (flat, :func:`fixed_settings`) ``now`` changes."""
    return [f"{k} {saved[k]!r} -> {now.get(k)!r}" for k in saved if now.get(k) != saved[k]]


def check_trained_settings(folder: Path, cfg, config: Path) -> None:
    """ValueError naming the model settings of ``config`` that differ from those ``folder`` was trained with
    (its complete.json's record, else the run's config.yaml): weights of the same shapes would load, and the
    export would carry a model that was not trained (another top_k, gate, units)."""
    try:
        trained = json.loads((folder / COMPLETE).read_text()).get("fixed")
    except (OSError, ValueError, AttributeError):
        trained = None
    run_config = folder.parent.parent / "config.yaml"
    if trained is None and run_config.is_file():
        trained = fixed_settings(load_config(run_config))
    changed = [c for c in changed_settings(trained or {}, fixed_settings(cfg)) if c.startswith("model.")]
    if changed:
        raise ValueError(f"{config} has other model settings than {folder} was trained with ({'; '.join(changed)}): the "
                         "export would carry a model that was not trained; pass the run's own config.yaml with --config")


def export_checkpoint(folder: str | Path, out_dir: str | Path, config: str | Path | None = None) -> Path:
    """Write a one-process export (local layout, ``model.export.save_export``) from a checkpoint of
    either backend and any ep_size, without DeepSpeed or a process group: DeepSpeed's non-expert
    weights (``mp_rank_00_model_states.pt``) plus every per-expert file (global expert ids) make a
    DeepSpeed-layout state dict holding all experts, which the local switch layers load
    (moe/expert_layout.py). The config defaults to the run's ``config.yaml`` two folders up."""
    folder = Path(folder)
    config = Path(config) if config else folder.parent.parent / "config.yaml"
    model_file = folder / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{folder} holds no {model_file.name}: pass a checkpoint folder (runs/NAME/checkpoints/step-N)")
    if not config.is_file():
        raise FileNotFoundError(f"no config at {config}: pass --config (the run's config.yaml)")
    cfg = load_config(config)
    state = load_weights_only(model_file)["module"]
    for expert_file in sorted(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(load_weights_only(expert_file))
    model = MMoEModel(export_config(cfg).model)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # another model's sizes: torch lists every mismatching tensor
        raise ValueError(f"the weights of {folder} do not fit {config} ({str(err).splitlines()[-1].strip()[:200]}): "
                         "pass the run's own config.yaml with --config") from None
    check_trained_settings(folder, cfg, config)  # after the sizes, which torch names tensor by tensor
    return save_export(model, cfg, out_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Checkpoint tools.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="convert a checkpoint (any MoE backend / ep_size) to a one-process export")
    e.add_argument("checkpoint", type=Path, help="runs/NAME/checkpoints/step-N")
    e.add_argument("out", type=Path, help="output folder (model.safetensors + config.yaml)")
    e.add_argument("--config", type=Path, help="the run's config.yaml (default: two folders above the checkpoint)")
    a = p.parse_args(argv)
    try:
        out = export_checkpoint(a.checkpoint, a.out, a.config)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:
        line = disk_full_line(err, a.out, then="free space, or export elsewhere")
        if line is None:
            raise
        sys.exit(line)
    print(f"export written: {out}")


if __name__ == "__main__":
    main()
