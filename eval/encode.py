"""Encode the whole KB once (entity cache) and a split's mentions, split across ranks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from eval.ranking import autocast_for
from moe.features import SideCache
from train import distributed as D
from train.model import BATCH_KEYS, MMoEModel


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def encode_side(
    model: MMoEModel, batches: Iterable[dict], device: torch.device, *, entity: bool, bf16: bool = True,
    gather: bool = False, total: int | None = None, desc: str = "",
) -> tuple[SideCache, dict[str, Tensor]]:
    """Run the entity (or mention) side over ``batches`` of this rank and return the cache with
    each row's ids (``entity_id``; or ``index`` and ``gold_id`` of mentions). With ``gather``,
    every rank gets all ranks' rows in rank order; ranks hold contiguous ranges, so that is
    dataset order (the KB cache)."""
    parts: list[SideCache] = []
    id_keys = ("entity_id",) if entity else ("index", "gold_id")
    ids: dict[str, list[Tensor]] = {k: [] for k in id_keys}
    bar = tqdm(total=total, desc=desc, unit="row", disable=not D.is_main() or None)
    with torch.no_grad(), autocast_for(device, bf16):
        for batch in batches:
            inputs = _to({k: batch[k] for k in BATCH_KEYS}, device)
            side, _ = model.entity_side(inputs) if entity else model.mention_side(inputs)
            parts.append(side.to(dtype=torch.float32))
            for k in id_keys:
                ids[k].append(batch[k].to(device))
            bar.update(len(batch[id_keys[0]]))
    bar.close()
    if not parts:
        raise ValueError(f"no {'entities' if entity else 'mentions'} to encode on rank {D.rank()}")
    local = SideCache.cat(parts)
    local_ids = {k: torch.cat(v) for k, v in ids.items()}
    if not gather or D.world() == 1:
        return local, local_ids
    cache = SideCache({k: D.gather_rows(v) for k, v in local.tensors.items()})
    return cache, {k: D.gather_rows(v) for k, v in local_ids.items()}
