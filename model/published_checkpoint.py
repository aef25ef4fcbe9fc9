"""Turn a checkpoint of the published MMoE code into our export, so our evaluator can rank with it.

    python -m model.published_checkpoint --checkpoint WikiMEL.ckpt --config launch/configs/wikimel.yaml \\
        --out runs/published-wikimel/best [--compat published|none] [--set section.key=value ...]

The published code saves PyTorch Lightning checkpoints: ``state_dict`` holds ``encoder.*`` (CLIP and
the two image maps) and ``matcher.*``. The config gives the architecture (``model.clip_path``: a
local CLIP ViT-B/32 folder, whose weights are then replaced by the checkpoint's, and the top-k of
the dataset); ``--compat published`` (the default) keeps the published computation, defects
included, which is what those weights were trained with: evaluate with
``python -m eval.evaluate --checkpoint OUT --split test`` (one process) to reproduce the published
numbers. The mapping of the names is in :mod:`moe.published`.

The file is not trusted: it is read with ``torch.load(weights_only=True)``. A Lightning checkpoint
also pickles its hyper-parameters (argparse/OmegaConf objects and the like); every such global is
replaced by an inert placeholder that runs no code and keeps nothing, so only tensors and plain
containers come out of the file.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

from core.cli import disk_full_line
from data_shards.collate import load_tokenizer
from model.config import ConfigError, load_config
from model.export import save_export
from model.factory import resolve_tokenizer
from model.mmoe import build_model
from moe.published import PublishedWeightsError, load_published_model


class _Inert:
    """Stands in for any class or function a checkpoint names besides tensors: accepts anything, does nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


def _inert_attribute(obj: object, name: object) -> type[_Inert]:
    """``getattr`` as a checkpoint uses it (``getattr(SomeClass, "method")``, then a call): the inert class."""
    return _Inert


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a (Lightning) checkpoint file, or the file itself if it is a plain state dict,
    without executing anything the file names (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    stubs = [(_inert_attribute if name == "builtins.getattr" else _Inert, name) for name in names]
    try:
        with torch.serialization.safe_globals(stubs):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: its non-tensor contents cannot be read safely ({str(err).splitlines()[-1][:200]}). Where you trust "
            "the file, save its weights alone and pass that file: "
            "torch.save(torch.load(CKPT, weights_only=False)['state_dict'], 'state_dict.pt')") from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: no state dict of tensors found (expected a Lightning checkpoint with 'state_dict')")
    return state


def import_checkpoint(checkpoint: str | Path, config: str | Path, out: str | Path, compat: str = "published",
                      overrides: list[str] | None = None) -> tuple[Path, list[str]]:
    """Build the model the config describes, load the published weights, write our export. Returns the
    export folder and the published keys that were dropped."""
    cfg = load_config(config, [f"model.matcher.compat={compat}", "model.matcher.moe.backend=local",
                               "model.matcher.moe.ep_size=1"] + list(overrides or []))
    state = read_state_dict(checkpoint)
    model, cfg = build_model(cfg, load_tokenizer(resolve_tokenizer(cfg)))
    dropped = load_published_model(model, state)
    return save_export(model, cfg, out), dropped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m model.published_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint saved by the published MMoE code (.ckpt)")
    p.add_argument("--config", required=True, help="our config for that dataset (launch/configs/*.yaml)")
    p.add_argument("--out", required=True, help="export folder to write (loadable by eval.evaluate and eval.link)")
    p.add_argument("--compat", default="published", choices=["published", "none"],
                   help="published (default): the computation the weights were trained with; none: our fixed model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = p.parse_args(argv)
    try:
        out, dropped = import_checkpoint(a.checkpoint, a.config, a.out, a.compat, a.overrides)
    except (ConfigError, PublishedWeightsError, FileNotFoundError, ValueError, OSError) as err:
        sys.exit(disk_full_line(err, a.out, then="free space, or write the export elsewhere (--out)") or f"error: {err}")
    print(f"wrote {out} (compat: {a.compat}); published keys not used: {dropped or 'none'}")


if __name__ == "__main__":
    main()
