"""What the headline number hides: H@1 / MRR on slices of the evaluated mentions.

Slices (each a pair that partitions the mentions; a slice with no mention is left out):
  gold_seen / gold_unseen     the gold entity occurs (or not: zero-shot) among the training mentions actually
                              trained on (the ``data.train_fraction`` subset when there is one)
  image / no_image            the mention has an image (after conversion: a missing file counts as none)
  desc_is_kb / desc_other     the mention's description is the gold's KB description verbatim (after
                              normalisation); only when descriptions are used and some mention has one
  tied / untied               another entity has exactly the gold's score
Metrics go into the results' ``metrics`` as ``slice/<name>/{H@1,MRR,mentions}`` (so the trainer's W&B
logging carries them), into the one-line summary and into a second table of the leaderboard file.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from data_shards.dme.candidates import normalise
from data_shards.folder import ShardFolder

PAIRS = (("gold_seen", "gold_unseen"), ("image", "no_image"), ("desc_is_kb", "desc_other"), ("tied", "untied"))
LABELS = {
    "gold_seen": "gold seen in train", "gold_unseen": "gold unseen in train (zero-shot)",
    "image": "mention with an image", "no_image": "mention without an image",
    "desc_is_kb": "description = gold's KB description", "desc_other": "other description",
    "tied": "gold tied with another entity", "untied": "gold not tied",
}
SHORT = {"gold_seen": "seen", "gold_unseen": "unseen", "image": "img", "no_image": "no-img", "desc_is_kb": "desc=KB",
         "desc_other": "other", "tied": "tied", "untied": "untied"}


def slice_masks(index: Tensor, facts: dict[int, tuple[int, bool, str]], ties: Tensor, seen: frozenset[int] | None,
                kb_desc: dict[int, str] | None) -> dict[str, np.ndarray]:
    """Boolean membership of every ranked mention (rows of ``index``) in every slice."""
    rows = [facts[int(i)] for i in index.tolist()]
    masks: dict[str, np.ndarray] = {}
    if seen is not None:
        masks["gold_seen"] = np.array([g in seen for g, _, _ in rows], dtype=bool)
    masks["image"] = np.array([img for _, img, _ in rows], dtype=bool)
    if kb_desc is not None:
        masks["desc_is_kb"] = np.array([bool(d.strip()) and normalise(d) == kb_desc[g] for g, _, d in rows], dtype=bool)
    masks["tied"] = ties.cpu().numpy() > 0
    for a, b in PAIRS:
        if a in masks:
            masks[b] = ~masks[a]
    return masks


def slice_metrics(ranks: Tensor, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """``slice/<name>/{H@1,MRR,mentions}`` (percent) for every non-empty slice, in PAIRS order."""
    r = ranks.double().cpu()
    out: dict[str, float] = {}
    for pair in PAIRS:
        for name in pair:
            if name not in masks or not masks[name].any():
                continue
            sel = r[torch.from_numpy(masks[name])]
            out[f"slice/{name}/H@1"] = 100.0 * (sel <= 1).double().mean().item()
            out[f"slice/{name}/MRR"] = 100.0 * (1.0 / sel).mean().item()
            out[f"slice/{name}/mentions"] = int(sel.numel())
    return out


def evaluation_slices(shards: ShardFolder, split: str, index: Tensor, ranks: Tensor, ties: Tensor, *, use_desc: bool,
                      train_fraction: float = 1.0, seed: int = 0,
                      fraction_mode: str = "random") -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Slice metrics of an evaluation (rows: the gathered per-mention ``index``, ``ranks``, ``ties``) and the masks.
    ``use_desc``: the mentions' descriptions are part of the model's input (``data.mention_desc``)."""
    facts = shards.mention_facts(split)  # both read once per folder object (data_shards/folder.py)
    seen = shards.train_golds(train_fraction, seed, fraction_mode)
    kb_desc = None
    if use_desc and any(d.strip() for _, _, d in facts.values()):
        store = shards.store()
        try:
            kb_desc = {g: normalise(store.get(g)["json"].get("desc") or "") for g in {g for g, _, _ in facts.values()}}
        finally:
            store.close()
    masks = slice_masks(index, facts, ties, seen, kb_desc)
    return slice_metrics(ranks, masks), masks


def names(metrics: dict[str, float]) -> list[str]:
    return [n for pair in PAIRS for n in pair if f"slice/{n}/mentions" in metrics]


def slices_line(metrics: dict[str, float]) -> str:
    """``slices H@1/MRR: seen 76.2/81.0 unseen 51.0/60.2 | img ...`` (empty without slices)."""
    present = set(names(metrics))
    parts = []
    for pair in PAIRS:
        got = [n for n in pair if n in present]
        if got:
            parts.append(" ".join(f"{SHORT[n]} {metrics[f'slice/{n}/H@1']:.1f}/{metrics[f'slice/{n}/MRR']:.1f}" for n in got))
    return ("slices H@1/MRR: " + " | ".join(parts)) if parts else ""


def slice_rows(metrics: dict[str, float]) -> list[list[str]]:
    return [[LABELS[n], str(int(metrics[f"slice/{n}/mentions"])), f"{metrics[f'slice/{n}/H@1']:.2f}",
             f"{metrics[f'slice/{n}/MRR']:.2f}"] for n in names(metrics)]


def slices_markdown(metrics: dict[str, float]) -> str:
    """The leaderboard's second table (empty without slices)."""
    rows = slice_rows(metrics)
    if not rows:
        return ""
    lines = ["#### Slices (this run)", "", "| slice | mentions | H@1 | MRR |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
