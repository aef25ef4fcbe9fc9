"""Model exports: the self-contained folder (``runs/NAME/best``) that evaluation, mining and linking
load without DeepSpeed, and what it records about the data it was trained on.

An export holds ``model.safetensors`` (every weight, switch layers in the local layout with all their
experts), ``config.yaml`` (the resolved config, backend local) and ``data_identity.json`` (tokenizer
and KB; data_shards/identity.py). It is replaced through ``NAME.tmp/`` and ``NAME.old/`` so that a
complete export exists at every instant.
"""

from __future__ import annotations

import copy
import errno
import functools
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from core import faults
from core.cli import disk_full
from core.hashing import file_sha256
from core.typed_config import load_yaml, missing_keys
from data_shards.collate import load_tokenizer
from data_shards.folder import ShardFolder, is_shards_folder
from data_shards.identity import IDENTITY_FILE, check_identity, write_identity
from model import distributed as D
from model.config import Config, ConfigError, apply_override, build, load_config, save_config, to_dict
from model.factory import resolve_tokenizer
from model.mmoe import MMoEModel
from moe.expert_parallel import local_state_dict

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_FILES = (EXPORT_WEIGHTS, EXPORT_CONFIG, IDENTITY_FILE)


def export_config(cfg: Config) -> Config:
    """The config an export is saved with: its weights are in the local layout, loadable on one process."""
    cfg = copy.deepcopy(cfg)
    cfg.model.matcher.moe.backend, cfg.model.matcher.moe.ep_size = "local", 1
    return cfg


def save_export(model: MMoEModel, cfg: Config, out_dir: str | Path) -> Path:
    """A self-contained copy of the model (weights + resolved config) that evaluation loads
    without DeepSpeed; written to a temporary folder and swapped in, so it is never half-written and
    a complete export exists at every instant: ``best/`` is renamed ``best.old/``, ``best.tmp/``
    renamed ``best/``, then ``best.old/`` removed. A kill between the two renames leaves ``best.old/``,
    which :func:`load_export` reads and :func:`recover_export` (the next save, the trainer's start)
    renames back.

    Always in the local layout (``model.matcher.moe.backend: local``), whatever the training backend.
    With expert-parallel DeepSpeed MoE layers (ep_size > 1) call it on every rank: the experts are
    gathered over each expert-parallel group and rank 0 writes. Otherwise rank 0 alone may call it."""
    state = local_state_dict(model)
    out_dir = Path(out_dir)
    if not D.is_main():
        return out_dir
    recover_export(out_dir)
    tmp, old = _sibling(out_dir, ".tmp"), _sibling(out_dir, ".old")
    check_replaceable(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a process killed while writing it
    _write_export(tmp, state, cfg, out_dir)
    swapped = out_dir.exists()
    if swapped:
        out_dir.rename(old)
        faults.kill_point("KILL_IN_EXPORT_SWAP")  # tests: die between the renames
    tmp.rename(out_dir)
    if swapped:
        shutil.rmtree(old)
    return out_dir


class ExportTargetError(FileExistsError):
    """The folder an export would replace holds something else than an export (the message names what)."""


# What the evaluation commands write into an export folder, about its weights (eval/kb_cache.py cache_path and its
# temporary name; eval/evaluate.py write_outputs, whose default --out is the export): replaced with the export.
_COMPANIONS = re.compile(r"\.?kb_cache-[0-9a-f]+(\.rows\d+-\d+)?\.pt(\.tmp-?\d+)?|results-[\w.-]+\.json|"
                         r"per_mention-[\w.-]+\.jsonl|leaderboard-[\w.-]+\.md")


def _foreign(folder: Path, partial: bool = False) -> list[str]:
    """What in ``folder`` is not part of an export of this project ([] for an export or an empty folder).
    A complete export holds its weights and config; ``partial`` (one being written): its weights at least."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return []
    foreign = [n for n in entries if n not in EXPORT_FILES and not _COMPANIONS.fullmatch(n)]
    needed = [EXPORT_WEIGHTS] if partial else [EXPORT_WEIGHTS, EXPORT_CONFIG]
    return foreign or ([] if set(needed) <= set(entries) else entries)


def check_replaceable(out_dir: str | Path) -> None:
    """ExportTargetError unless ``out_dir`` and the siblings :func:`save_export` uses (``NAME.tmp/``, ``NAME.old/``)
    are absent, empty or exports of this project: an export never replaces anyone else's files."""
    out_dir = Path(out_dir)
    for folder, partial in ((out_dir, False), (_sibling(out_dir, ".tmp"), True), (_sibling(out_dir, ".old"), False)):
        if not folder.exists() and not folder.is_symlink():
            continue
        if folder.is_symlink() or not folder.is_dir():
            raise ExportTargetError(f"{folder} exists and is not a folder: choose another folder for the export "
                                    "(nothing was written)")
        there = _foreign(folder, partial)
        if there:
            shown = ", ".join(there[:6]) + (f" and {len(there) - 6} more" if len(there) > 6 else "")
            raise ExportTargetError(f"{folder} is not empty and is not a model export ({shown}): exporting would "
                                    "replace it; choose a new or empty folder for the export (nothing was written)")


def _write_export(tmp: Path, state: dict[str, torch.Tensor], cfg: Config, out_dir: Path) -> None:
    """The export's files in ``tmp``; on any failure ``tmp`` is removed. A full disk (safetensors names no
    errno) is raised as OSError ENOSPC naming ``out_dir``, whose previous export is untouched."""
    try:
        tmp.mkdir(parents=True)
        save_config(export_config(cfg), tmp / EXPORT_CONFIG)
        # The weights carry their config's sha256: a config cut or edited afterwards is refused, not read with defaults.
        save_file(state, str(tmp / EXPORT_WEIGHTS), metadata={CONFIG_DIGEST: file_sha256(tmp / EXPORT_CONFIG)})
        write_data_identity(tmp, cfg)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not disk_full(err):
            raise
        raise OSError(errno.ENOSPC, f"no space left on device while writing the export {out_dir} (the partial "
                      f"{tmp.name}/ was removed; the previous export is untouched)", str(out_dir)) from None


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(path)


def data_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The tokenizer ``cfg`` resolves to (model.factory.resolve_tokenizer)."""
    return _tokenizer_at(resolve_tokenizer(cfg))


def write_data_identity(folder: Path, cfg: Config) -> None:
    """The export's data_identity.json (data_shards/identity.py): the tokenizer and the KB it was trained on."""
    try:
        tokenizer = data_tokenizer(cfg)
    except (ConfigError, OSError):
        tokenizer = None  # recorded as unknown; commands using the export then warn
    shards = cfg.data.shards
    write_identity(folder, tokenizer, ShardFolder.open(shards) if shards is not None and is_shards_folder(shards) else None)


def check_data_identity(export: str | Path, cfg: Config, allow_other_kb: bool = False) -> None:
    """DataMismatch (a ValueError) when ``cfg``'s tokenizer or KB is not what ``export`` was trained on."""
    tokenizer = data_tokenizer(cfg)
    check_identity(export, tokenizer, ShardFolder.open(cfg.data.shards), allow_other_kb)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def recover_export(out_dir: str | Path) -> None:
    """Finish an export swap that a kill interrupted (rank 0): ``best.old/`` without ``best/`` becomes
    ``best/`` again (the export the last checkpoint knows); beside a complete ``best/`` it is removed."""
    out_dir = Path(out_dir)
    old = _sibling(out_dir, ".old")
    if not old.is_dir() or old.is_symlink() or _foreign(old):
        return  # not an export left by the swap: check_replaceable names it
    if (out_dir / EXPORT_WEIGHTS).is_file():
        shutil.rmtree(old)
    elif not out_dir.exists() or (out_dir.is_dir() and not out_dir.is_symlink() and not _foreign(out_dir)):
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty
        old.rename(out_dir)


class ExportError(ValueError):
    """An export folder whose files cannot be read (truncated, garbled, from two models); the message names the file."""


# What train/checkpointing.py writes into a training checkpoint (runs/NAME/checkpoints/step-N); model/ cannot import train/.
TRAINING_CHECKPOINT_FILES = ("complete.json", "mp_rank_00_model_states.pt")
REEXPORT = "restore it, or export the run again (python -m train.checkpointing export runs/NAME/checkpoints/step-N OUT)"


def _not_an_export(path: Path) -> FileNotFoundError:
    """Why ``path`` is no export, and what to pass instead."""
    if not path.exists():
        return FileNotFoundError(f"{path} does not exist: pass a model export (runs/NAME/best)")
    if any((path / name).is_file() for name in TRAINING_CHECKPOINT_FILES):
        return FileNotFoundError(
            f"{path} is a training checkpoint (DeepSpeed state), not a model export: convert it with "
            f"`python -m train.checkpointing export {path} OUT` (add --config runs/NAME/config.yaml when the run's config "
            "is not two folders above it) and pass OUT, or pass the run's best export (runs/NAME/best)")
    for best in (path / "best", path.parent / "best"):  # a run folder, or its checkpoints/ folder
        if (best / EXPORT_WEIGHTS).is_file():
            return FileNotFoundError(f"{path} holds no {EXPORT_WEIGHTS}: it is not a model export; pass {best}")
    return FileNotFoundError(f"{path} holds no {EXPORT_WEIGHTS}: pass a model export (runs/NAME/best)")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def _export_cfg(path: Path) -> Config:
    """The export's config.yaml, in the local layout; ExportError names the file when it is garbled."""
    file = path / EXPORT_CONFIG
    if not file.is_file():
        raise ExportError(f"{path} holds {EXPORT_WEIGHTS} but no {EXPORT_CONFIG}: the export is incomplete; {REEXPORT}")
    try:
        data = load_yaml(file)  # garbled YAML or text: named as such first
        saved = _config_digest(path / EXPORT_WEIGHTS)
        if saved is not None and saved != file_sha256(file):
            raise ConfigError(f"{file} is not the config exported with {EXPORT_WEIGHTS} (its sha256 differs from the "
                              "one the weights record: cut or edited)" + _missing_note(data))
        cfg = build(Config, data)
        if saved is None:  # an export of an earlier version: no digest; its model section must be whole
            check_model_keys(file, data)
        return export_config(cfg)  # exports hold the local layout
    except ConfigError as err:  # garbled YAML or text, keys and values this code does not accept, keys missing
        named = str(err) if str(err).startswith(str(file)) else f"{file}: {err}"
        raise ExportError(f"{named}; the export config is damaged or from another version: {REEXPORT}") from None


CONFIG_DIGEST = "config_sha256"  # metadata of model.safetensors: the sha256 of the config.yaml written with it


def _config_digest(weights: Path) -> str | None:
    """The config sha256 the weights file records (None: an earlier export, or a header that cannot be read,
    which loading the weights then reports)."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return (fh.metadata() or {}).get(CONFIG_DIGEST)
    except (SafetensorError, OSError):
        return None


def _lacking(missing: list[str]) -> str:
    """The first keys of ``missing``, and how many more."""
    return ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")


def _missing_note(data: dict) -> str:
    missing = missing_keys(Config, data)
    return f"; it lacks {_lacking(missing)}" if missing else ""


def check_model_keys(file: Path, data: dict) -> None:
    """ConfigError naming the first model keys ``data`` lacks (an export without a config digest): save_export
    writes every key, so a missing one is a truncated or edited file, whose defaults would silently change the
    model; keys of the other sections may postdate the export and take their defaults."""
    missing = [k for k in missing_keys(Config, data) if k.split(".", 1)[0] == "model"]
    if missing:
        raise ConfigError(f"{file} lacks {_lacking(missing)} (an export's config lists every key)")


def _export_weights(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """The export's tensors, read by safetensors (never unpickled); ExportError names a damaged file."""
    file = path / EXPORT_WEIGHTS
    try:
        return load_file(str(file), device=str(map_location))
    except SafetensorError as err:
        raise ExportError(f"{file} is truncated or damaged ({_one_line(err)}); {REEXPORT}") from None


def load_export(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MMoEModel, Config]:
    """The model and config of an export folder. FileNotFoundError: not an export (says what to pass);
    ExportError: an export whose files are damaged or do not fit together."""
    path = Path(path)
    if not (path / EXPORT_WEIGHTS).is_file() and (_sibling(path, ".old") / EXPORT_WEIGHTS).is_file():
        path = _sibling(path, ".old")  # read during (or after a kill in) save_export's swap: the previous export
    if not (path / EXPORT_WEIGHTS).is_file():
        raise _not_an_export(path)
    cfg = _export_cfg(path)
    model = MMoEModel(cfg.model)
    try:
        missing, unexpected = model.load_state_dict(_export_weights(path, map_location), strict=False)
    except RuntimeError as err:  # shapes that differ from the config's
        raise ExportError(f"{path / EXPORT_WEIGHTS} does not fit {path / EXPORT_CONFIG} ({_one_line(err)}); {REEXPORT}") from None
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]}); "
                          f"{REEXPORT}")
    return model, cfg



def load_export_for_command(checkpoint: str | Path, settings: list[str], config: str | Path | None = None,
                            sections: tuple[str, ...] = ("data", "eval", "negatives"),
                            allow_other_kb: bool = False) -> tuple[MMoEModel, Config]:
    """An export for a command-line tool: ``config``'s ``sections`` replace the export's (the model
    section always comes from the export, since it must fit the weights), then ``settings``
    (``section.key=value``) apply. The data's tokenizer and KB are then checked against the ones the
    export was trained on. Errors are ConfigError/FileNotFoundError/ValueError (ExportError, DataMismatch)."""
    model, cfg = load_export(checkpoint)
    data = to_dict(cfg)
    if config:
        try:
            other = to_dict(load_config(config))
        except ConfigError as err:
            raise ConfigError(str(err) if str(err).startswith(str(config)) else f"{config}: {err}") from None
        for section in sections:
            data[section] = other[section]
    for assignment in settings:
        apply_override(data, assignment)
    cfg = build(Config, data)
    check_data_identity(checkpoint, cfg, allow_other_kb)
    return model, cfg

