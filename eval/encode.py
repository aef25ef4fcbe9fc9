"""Encode the whole KB once (entity cache) and a split's mentions, split across ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from data_shards.folder import ShardFolder
from data_shards.store import ShardError
from data_shards.stream import OrderedStream, make_loader
from eval.kb_cache import CacheValueError, compress
from eval.ranking import autocast_for, slice_align
from model import distributed as D
from model.mmoe import BATCH_KEYS, MMoEModel
from moe.features import Features, SideCache


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


class _Blocker:
    """Feeds the matcher side exactly ``block`` rows at a time (the last block may be shorter).

    Only ``model.matcher.compat: published`` needs it: the published gate normalises over the batch,
    so a side's output depends on which rows share its call, and the published evaluation's blocks
    (entity blocks of 6,000 KB rows, mention batches of 20) must be reproduced row for row."""

    def __init__(self, fn, block: int) -> None:
        self.fn, self.block = fn, block
        self.pending: list[Features] = []
        self.rows = 0

    def push(self, f: Features) -> list[SideCache]:
        self.pending.append(f)
        self.rows += len(f)
        out = []
        while self.rows >= self.block:
            feats = Features.cat(self.pending)
            out.append(self.fn(feats.index(slice(0, self.block)))[0])
            rest = feats.index(slice(self.block, None))
            self.pending, self.rows = ([rest] if len(rest) else []), len(rest)
        return out

    def flush(self) -> list[SideCache]:
        if not self.rows:
            return []
        out = [self.fn(Features.cat(self.pending))[0]]
        self.pending, self.rows = [], 0
        return out


INTERRUPT_EVERY = 16  # batches between two interrupt checks while encoding (one tiny all-reduce each)


class Interrupted(Exception):
    """An evaluation or mining stopped early because ``interrupt()`` said so (a stop signal: the trainer
    checkpoints and exits, and evaluates again after the resume)."""


def check_interrupt(interrupt: Callable[[], bool] | None, where: str) -> None:
    """Raise Interrupted when ``interrupt`` (collective: every rank calls it at the same points) says stop."""
    if interrupt is not None and interrupt():
        raise Interrupted(where)


class RowWriter:
    """A side cache written in place, batch by batch: one buffer per tensor for all ``rows``, allocated at the
    first batch, each batch stored through ``store`` (eval.kb_cache.compress to the cache dtype). The peak is
    the stored cache plus a batch, instead of every batch in fp32 and then their concatenation (about 3.5x
    an fp32 cache, measured at 200k entities). A batch that ``store`` refuses (CacheValueError) is
    remembered and the rest skipped: the caller raises it once every rank is past its collectives."""

    def __init__(self, rows: int, store: Callable[[SideCache], SideCache] | None = None) -> None:
        self.rows, self.store = rows, store
        self.buffers: dict[str, Tensor] | None = None
        self.filled = 0
        self.error: CacheValueError | None = None

    def add(self, part: SideCache) -> None:
        if self.error is not None:
            return
        try:
            part = self.store(part) if self.store else part
        except CacheValueError as err:
            self.error = err
            return
        if self.buffers is None:
            self.buffers = {k: torch.empty((self.rows, *v.shape[1:]), dtype=v.dtype, device=v.device)
                            for k, v in part.tensors.items()}
        if self.filled + len(part) > self.rows:
            raise ShardError(f"more rows than the {self.rows} expected: the shards disagree with the manifest")
        for k, v in part.tensors.items():
            self.buffers[k][self.filled : self.filled + len(part)] = v
        self.filled += len(part)

    def result(self) -> SideCache:
        if self.error is not None:
            raise self.error
        if self.buffers is None or self.filled != self.rows:
            raise ShardError(f"{self.filled} rows encoded, {self.rows} expected: the shards disagree with the manifest")
        return SideCache(self.buffers)


def encode_side(
    model: MMoEModel, batches: Iterable[dict], device: torch.device, *, entity: bool, bf16: bool = True,
    gather: bool = False, total: int | None = None, desc: str = "", block: int | None = None,
    interrupt: Callable[[], bool] | None = None, common_batches: int = 0, writer: RowWriter | None = None,
) -> tuple[SideCache, dict[str, Tensor]]:
    """Run the entity (or mention) side over ``batches`` of this rank and return the cache with
    each row's ids (``entity_id``; or ``index`` and ``gold_id`` of mentions). With ``gather``,
    every rank gets all ranks' rows in rank order; ranks hold contiguous ranges, so that is
    dataset order (the KB cache). ``block`` (compat: published only) runs the matcher side on
    exactly that many consecutive rows at a time, whatever the loader's batch size; this rank's rows
    must then start at a block boundary (``OrderedStream(..., align=block)``). ``interrupt`` is asked every
    INTERRUPT_EVERY batches among the first ``common_batches`` (which every rank has), so that all ranks ask
    at the same batches. ``writer`` (not with ``gather`` or ``block``): the rows go there as they are encoded."""
    parts: list[SideCache] = []
    id_keys = ("entity_id",) if entity else ("index", "gold_id")
    ids: dict[str, list[Tensor]] = {k: [] for k in id_keys}
    side_fn = model.matcher.entity_side if entity else model.matcher.mention_side
    blocker = _Blocker(side_fn, block) if block else None
    bar = tqdm(total=total, desc=desc, unit="row", disable=not D.is_main() or None)
    with torch.no_grad(), autocast_for(device, bf16):
        for batch in batches:
            feats = model.features(_to({k: batch[k] for k in BATCH_KEYS}, device))
            sides = blocker.push(feats) if blocker else [side_fn(feats)[0]]
            if writer is not None:
                writer.add(sides[0].to(dtype=torch.float32))
            else:
                parts += [s.to(dtype=torch.float32) for s in sides]
            for k in id_keys:
                ids[k].append(batch[k].to(device))
            bar.update(len(batch[id_keys[0]]))
            done = len(ids[id_keys[0]])
            if done % INTERRUPT_EVERY == 0 and done <= common_batches:
                check_interrupt(interrupt, desc)
        if blocker:
            parts += [s.to(dtype=torch.float32) for s in blocker.flush()]
    bar.close()
    if not parts and (writer is None or not writer.filled):
        raise ValueError(f"no {'entities' if entity else 'mentions'} to encode on rank {D.rank()}")
    local = writer.result() if writer is not None else SideCache.cat(parts)
    local_ids = {k: torch.cat(v) for k, v in ids.items()}
    if not gather or D.world() == 1:
        return local, local_ids
    cache = SideCache({k: D.gather_rows(v) for k, v in local.tensors.items()})
    return cache, {k: D.gather_rows(v) for k, v in local_ids.items()}


def encode_kb(model: MMoEModel, shards: ShardFolder, collator, device: torch.device, *, batch_size: int, num_workers: int,
              bf16: bool = True, distributed: bool = True, block: int | None = None, desc: str = "encode KB",
              interrupt: Callable[[], bool] | None = None, sharded: bool = False,
              cache_dtype: str = "float32") -> SideCache | None:
    """The entity cache of the whole KB, rows in entity-id order, on every rank.

    ``distributed``: ranks encode contiguous shares and gather them; otherwise this process encodes
    everything. ``block`` (compat: published) computes the entity side on blocks of that many KB rows;
    every rank then encodes the whole KB, so the blocks are the published ones on any number of ranks.
    ``sharded``: each rank encodes and keeps its own slice only (eval/sharded.py: KBShard), None on a rank
    whose slice is empty; its rows are stored in ``cache_dtype`` as they come (:class:`RowWriter`; a value
    that dtype refuses raises CacheValueError after the encoding, on that rank only)."""
    split_work = distributed and block is None
    world, rank = (D.world(), D.rank()) if split_work or sharded else (1, 0)
    align = slice_align(shards.shard_set("kb").total, world) if sharded else 1
    stream = OrderedStream(shards, "kb", collator, batch_size, world, rank, align=align)
    if sharded and not len(stream):
        return None
    writer = RowWriter(len(stream), lambda part: compress(part, cache_dtype)) if sharded and block is None else None
    cache, ids = encode_side(model, make_loader(stream, num_workers), device, entity=True, bf16=bf16,
                             gather=split_work and not sharded, total=len(stream), desc=desc, block=block,
                             interrupt=interrupt, common_batches=stream.common_batches, writer=writer)
    first = stream.range[0] if sharded else 0
    if not torch.equal(ids["entity_id"].cpu(), torch.arange(first, first + len(cache))):
        raise ShardError(f"{shards}: KB cache rows are not in entity id order: the KB shards are inconsistent with the "
                           "manifest; convert the dataset again")
    return cache


def encode_split(model: MMoEModel, shards: ShardFolder, split: str, collator, device: torch.device, *, batch_size: int,
                 num_workers: int, bf16: bool = True, distributed: bool = True, block: int | None = None,
                 desc: str | None = None, interrupt: Callable[[], bool] | None = None) -> tuple[SideCache, dict[str, Tensor]]:
    """The mention cache of this rank's share of ``split`` (all of it unless ``distributed``), with each
    row's ``index`` and ``gold_id``. ``block`` (compat: published): the mention side on batches of that
    many mentions, each rank's share made of whole batches."""
    world, rank = (D.world(), D.rank()) if distributed else (1, 0)
    stream = OrderedStream(shards, split, collator, batch_size, world, rank, align=block or 1)
    return encode_side(model, make_loader(stream, num_workers), device, entity=False, bf16=bf16, total=len(stream),
                       desc=desc or f"encode {split}", block=block, interrupt=interrupt,
                       common_batches=stream.common_batches)
