"""The optimizer's parameter groups and each group's learning-rate schedule.

Schedules (the ``schedule`` key of a group):
  ``matcher``  everything outside the encoder's towers (the matcher, the encoder's projections): train.lr;
  ``clip``     the CLIP encoder (model.encoder: clip): train.clip_lr (< 0: train.lr);
  ``text``, ``vision``  the towers of model.encoder: towers: train.text_lr / train.vision_lr (< 0: clip_lr).
Each is split by weight decay: parameters whose name contains ``bias`` get none (``<name>_no_decay``, as
published; a ``LayerNorm``'s weight decays). With train.layer_decay = d < 1, each encoder group splits by depth:
layer i (0-based) of a tower's L layers at d^(L - i), its embeddings at d^(L + 1), the rest (final norms,
pooling heads) at 1 (``<name>@<depth>``, the full-rate group keeping the plain name).
Order: the decay groups of matcher, then of the encoder schedules, then their no-decay halves (for CLIP without
layer decay: matcher, clip, matcher_no_decay, clip_no_decay, so the logged ``lr`` list keeps clip at index 1).

The factor of each schedule at an optimizer step (``group_lr_factors``): 0 while the group is frozen
(train.freeze_text_steps / freeze_vision_steps), then train.schedule (constant, linear or cosine decay to the
end) after a linear warm-up (train.warmup_steps for the matcher, train.encoder_warmup_steps for the encoder,
-1: the same) counted from the step the group starts training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from torch import nn

from model.config import Config

_LAYER = re.compile(r"^(?P<root>.+?)\.(?:encoder\.)?layers?\.(?P<i>\d+)\.")
ENCODER_PREFIXES = {"encoder.clip.": "clip", "encoder.text.": "text", "encoder.vision.": "vision"}


def schedule_of(name: str) -> str:
    """The schedule a parameter (by its name in MMoEModel) belongs to."""
    for prefix, schedule in ENCODER_PREFIXES.items():
        if name.startswith(prefix):
            return schedule
    return "matcher"


def base_lrs(cfg: Config) -> dict[str, float]:
    t = cfg.train
    lr = {"matcher": t.lr, "clip": t.lr if t.clip_lr < 0 else t.clip_lr}
    lr["text"] = lr["clip"] if t.text_lr < 0 else t.text_lr
    lr["vision"] = lr["clip"] if t.vision_lr < 0 else t.vision_lr
    return lr


def depths(names: list[str]) -> dict[str, int]:
    """Each encoder parameter's depth for layer-wise decay: 0 embeddings, i + 1 layer i, L + 1 the rest, where L
    is the number of layers of the tower (``root``) the parameter is in; ``top``: the depth of the rest."""
    layers: dict[str, int] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            layers[m["root"]] = max(layers.get(m["root"], 0), int(m["i"]) + 1)
    deepest = max(layers.values(), default=0)
    out = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            out[n] = int(m["i"]) + 1 + (deepest - layers[m["root"]])  # towers of fewer layers are aligned at the top
        elif "embed" in n:
            out[n] = 0
        else:
            out[n] = deepest + 1
    return out


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """The optimizer's groups (module docstring); with DeepSpeed MoE layers their expert parameters move to extra
    groups marked ``moe`` (one per expert-parallel group, at the rate of the group they came from), appended after
    these, as DeepSpeed requires for ZeRO and for reducing expert gradients over the expert-data-parallel group."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    schedules = ["matcher"] + [s for s in ("clip", "text", "vision") if any(schedule_of(n) == s for n, _ in named)]
    lr, decay = base_lrs(cfg), cfg.train.layer_decay
    depth = depths([n for n, _ in named if schedule_of(n) != "matcher"]) if decay < 1 else {}
    top = max(depth.values(), default=0)
    groups: list[dict] = []
    for decays in (True, False):
        for s in schedules:
            levels = sorted({depth.get(n, top) for n, _ in named if schedule_of(n) == s}, reverse=True) or [top]
            for level in levels:
                params = [p for n, p in named if schedule_of(n) == s and ("bias" not in n) == decays
                          and depth.get(n, top) == level]
                name = s + ("" if decays else "_no_decay") + ("" if level == top else f"@{level}")
                if not params and level != top:
                    continue
                groups.append({"params": params, "lr": lr[s] * decay ** (top - level), "name": name, "schedule": s,
                               "weight_decay": cfg.train.weight_decay if decays else 0.0})
    if cfg.model.matcher.moe.backend == "deepspeed":
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def lr_factor(schedule: str, warmup: int, total: int, start: int = 0) -> Callable[[int], float]:
    """The factor of a group's base rate at an optimizer step: 0 before ``start``, then a linear warm-up of
    ``warmup`` steps, then constant or a linear / cosine decay to 0 at ``total``."""
    def f(step: int) -> float:
        if step < start:
            return 0.0
        step, span = step - start, total - start
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or span <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, span - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def group_lr_factors(groups: list[dict], cfg: Config, total: int) -> list[Callable[[int], float]]:
    """One factor function per optimizer group (LambdaLR's list), by the group's schedule."""
    t = cfg.train
    encoder_warmup = t.warmup_steps if t.encoder_warmup_steps < 0 else t.encoder_warmup_steps
    start = {"matcher": 0, "clip": 0, "text": max(0, t.freeze_text_steps), "vision": max(0, t.freeze_vision_steps)}
    by_schedule = {s: lr_factor(t.schedule, t.warmup_steps if s == "matcher" else encoder_warmup, total, start[s])
                   for s in start}
    return [by_schedule[_schedule(g)] for g in groups]


def frozen_towers(cfg: Config) -> list[str]:
    """The towers never trained (train.freeze_*_steps = -1): their parameters get no gradient."""
    t = cfg.train
    return [side for side, steps in (("text", t.freeze_text_steps), ("vision", t.freeze_vision_steps)) if steps == -1]


def freeze(model: nn.Module, towers: list[str]) -> None:
    for side in towers:
        for p in getattr(model.encoder, side).parameters():
            p.requires_grad_(False)


def _schedule(group: dict) -> str:
    """A group's schedule (a group restored from a checkpoint written before groups carried one: by its name)."""
    if "schedule" in group:
        return group["schedule"]
    base = str(group.get("name", "")).split("@")[0].removesuffix("_no_decay")
    return base if base in ("clip", "text", "vision") else "matcher"


def lr_metrics(groups: list[dict], lrs: list[float]) -> dict[str, float]:
    """``train/lr`` (the matcher's) and ``train/lr_<schedule>`` for each encoder schedule: the rate of its
    full-rate, decayed group at this step."""
    out = {}
    for g, value in zip(groups, lrs, strict=True):
        s = _schedule(g)
        key = "train/lr" if s == "matcher" else f"train/lr_{s}"
        if key not in out and not g.get("moe") and g.get("name") == s:
            out[key] = value
    return out
