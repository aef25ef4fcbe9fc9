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
) -> tuple[SideCache, Tensor]:
    """Run the entity (or mention) side over ``batches`` of this rank and return the cache with
    each row's id (entity id or mention index). With ``gather``, every rank gets all ranks' rows
    in rank order; ranks hold contiguous ranges, so that is dataset order (the KB cache)."""
    parts, ids = [], []
    id_key = "entity_id" if entity else "index"
    bar = tqdm(total=total, desc=desc, unit="row", disable=not D.is_main() or None)
    with torch.no_grad(), autocast_for(device, bf16):
        for batch in batches:
            inputs = _to({k: batch[k] for k in BATCH_KEYS}, device)
            side, _ = model.entity_side(inputs) if entity else model.mention_side(inputs)
            parts.append(side.to(dtype=torch.float32))
            ids.append(batch[id_key].to(device))
            bar.update(len(batch[id_key]))
    bar.close()
    if not parts:
        raise ValueError(f"no {'entities' if entity else 'mentions'} to encode on rank {D.rank()}")
    local = SideCache.cat(parts)
    local_ids = torch.cat(ids)
    if not gather or D.world() == 1:
        return local, local_ids
    gathered = SideCache({k: D.gather_rows(v) for k, v in local.tensors.items()})
    return gathered, D.gather_rows(local_ids)
