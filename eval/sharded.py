"""The KB sharded across ranks at evaluation (``eval.kb_sharding: sharded``).

Each rank keeps the entity cache of one contiguous slice of the KB only (and, for two-stage, a FAISS
index over that slice), so the cache costs each rank 1/W of the KB instead of all of it. Every mention
is still ranked against every entity:

* exact (:func:`sharded_exact_ranks`): each rank's mentions are broadcast in the chunks the gathered path
  scores them in; every rank scores a chunk against its slice in the gathered path's blocks (slices start
  at multiples of the largest block, eval/ranking.py: block_rows), so every score is bit-identical to the
  gathered path's. The gold's score comes from the slice that holds it, the counts of higher and equal
  scores are summed over the slices, and each slice's best entities are merged (higher score first,
  lower id among equal scores, the order eval/ranking.py: top_entities gives the whole row).
* two-stage (:class:`ShardedCandidates`): each slice's index returns its K best; the K best of those are
  the candidates (the whole KB's, for a flat index, but for entities tied exactly at the K-th score, where
  FAISS's own choice is arbitrary); their cache rows are fetched from the slices that hold them
  (all-to-all), and the mention's own rank re-ranks them as the gathered path does.

The per-rank results are merged with collectives: every function here is collective (every rank calls it
with its own mentions, in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from data_shards.stream import aligned_ranges
from eval.kb_cache import cache_device
from eval.metrics import NonFiniteScoreError
from eval.ranking import (
    TOP_SAVED,
    RankResult,
    best_first,
    kb_index,
    score_against_kb,
    search,
    slice_align,
    top_entities,
)
from model import distributed as D
from moe.features import SideCache
from moe.matcher import MMoEMatcher


@dataclass(frozen=True)
class KBShard:
    """Which rows of an ``total``-entity KB each rank holds: contiguous ``ranges``, in rank order, each
    starting at a multiple of ``align`` (a rank's range may be empty when the KB is small)."""

    total: int
    ranges: tuple[tuple[int, int], ...]
    align: int
    rank: int

    @staticmethod
    def of(total: int, world: int, rank: int) -> KBShard:
        align = slice_align(total, world)
        return KBShard(total, tuple(aligned_ranges(total, world, align)), align, rank)

    @property
    def start(self) -> int:
        return self.ranges[self.rank][0]

    @property
    def stop(self) -> int:
        return self.ranges[self.rank][1]

    def owners(self, ids: Tensor) -> Tensor:
        """The rank holding each entity id (ids in [0, total))."""
        stops = torch.tensor([b for _, b in self.ranges], dtype=ids.dtype, device=ids.device)
        return torch.searchsorted(stops, ids, right=True)


def _row_spec(cache: SideCache) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each tensor's shape past the row dimension and dtype: what a receiver needs to allocate its rows."""
    return {k: (tuple(v.shape[1:]), v.dtype) for k, v in cache.tensors.items()}


def empty_like_rank0(cache: SideCache | None, device: torch.device) -> SideCache:
    """This rank's cache, or, on a rank whose slice holds no entity (``cache`` None), a cache of no rows with
    rank 0's tensors' names, shapes and dtypes (rank 0's slice is never empty); collective."""
    spec = D.broadcast_object(_row_spec(cache) if D.rank() == 0 else None, 0)
    if cache is not None:
        return cache
    return SideCache({k: torch.empty(0, *shape, dtype=dtype, device=device) for k, (shape, dtype) in spec.items()})


def _broadcast_cache(cache: SideCache | None, src: int, rows: int, spec: dict, device: torch.device) -> SideCache:
    return SideCache({k: D.broadcast_rows(None if cache is None else cache[k], src, rows, shape, dtype, device)
                      for k, (shape, dtype) in spec.items()})


def _merge_best(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Every rank's best (values, ids) [m, k_each] -> the ``k`` best of them all, on every rank."""
    m = values.shape[0]
    all_values = D.gather_rows(values).view(D.world(), m, -1).permute(1, 0, 2).reshape(m, -1)
    all_ids = D.gather_rows(ids).view(D.world(), m, -1).permute(1, 0, 2).reshape(m, -1)
    return best_first(all_values, all_ids, k)


def _padded(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rows of ``k`` (value, id) pairs: missing ones are (-inf, -1), after every real one."""
    short = k - values.shape[1]
    if short <= 0:
        return values, ids
    return (torch.cat([values, values.new_full((len(values), short), float("-inf"))], 1),
            torch.cat([ids, ids.new_full((len(ids), short), -1)], 1))


def sharded_exact_ranks(
    matcher: MMoEMatcher, mentions: SideCache, gold: Tensor, kb: SideCache, shard: KBShard, *,
    mention_chunk: int = 64, max_pair_elements: int = 0, bf16: bool = True,
) -> RankResult:
    """eval.ranking.exact_ranks of this rank's ``mentions`` against the whole KB, of which this rank holds
    the slice ``kb`` (rows shard.start .. shard.stop); equal to it rank for rank, tie for tie, top entity for
    top entity. Collective."""
    device = cache_device(kb)
    counts = D.gather_objects(len(mentions))
    specs = D.gather_objects(_row_spec(mentions))
    n_top = min(TOP_SAVED, shard.total)
    parts, bad = [], []
    for src in range(D.world()):
        mine = src == D.rank()
        for m0 in range(0, counts[src], mention_chunk):
            m = min(mention_chunk, counts[src] - m0)
            chunk = _broadcast_cache(mentions.slice(m0, m0 + m) if mine else None, src, m, specs[src], device)
            g = D.broadcast_rows(gold[m0 : m0 + m].to(device, torch.int64) if mine else None, src, m, (), torch.int64,
                                 device)
            row = score_against_kb(matcher, chunk, kb, max_pair_elements, bf16, shard.align)  # [m, this slice]
            finite = torch.isfinite(row).all(dim=1)
            if not bool(finite.all()):  # the mention is reported, not ranked; keep the arithmetic below defined
                row = torch.where(finite[:, None], row, torch.zeros_like(row))
            local = g - shard.start
            own = (local >= 0) & (local < row.shape[1])
            gold_score = torch.zeros(m, device=device)
            gold_score[own] = row[own, local[own]]
            # The gold's score from its slice (the others add 0) and the slices' non-finite rows, in one sum.
            first = D.all_reduce_sum(torch.stack([gold_score, (~finite).float()]))
            gold_score, nonfinite = first[0], first[1] > 0
            counted = D.all_reduce_sum(torch.stack([(row > gold_score[:, None]).sum(dim=1),
                                                    (row == gold_score[:, None]).sum(dim=1)]))
            values, cols = top_entities(row, min(n_top, row.shape[1]))
            values, ids = _padded(values, cols + shard.start, n_top)
            top_scores, top_ids = _merge_best(values, ids, n_top)
            if mine:
                bad.extend(m0 + i for i in torch.nonzero(nonfinite).flatten().tolist())
                parts.append(RankResult((counted[0] + 1).cpu(), (counted[1] - 1).cpu(), top_ids.cpu(), top_scores.cpu()))
    if bad:
        raise NonFiniteScoreError(f"{len(bad)} mention(s) got a NaN or inf score (positions {bad[:5]})", bad)
    return RankResult.cat(parts)


def shard_index(matcher: MMoEMatcher, kb: SideCache, kind: str, rows: int, entities: int, nlist: int = 0,
                nprobe: int = 32):
    """The FAISS index over this rank's slice (None for an empty slice); ``kind`` auto is resolved by the whole
    KB's size, ``entities``. A non-finite entity vector on any slice raises NonFiniteScoreError for this rank's
    ``rows`` mentions on every rank; collective."""
    index, error = None, None
    if len(kb):
        try:
            index = kb_index(matcher, kb, kind, rows=rows, entities=entities, nlist=nlist, nprobe=nprobe)
        except NonFiniteScoreError as err:
            error = str(err)
    errors = [e for e in D.gather_objects(error) if e]
    if errors:
        raise NonFiniteScoreError(errors[0], list(range(rows)))
    return index


class ShardedCandidates:
    """eval.ranking.LocalCandidates over a KB sharded across ranks: this rank's ``index`` covers its slice
    ``kb`` (rows shard.start .. shard.stop). Every method is collective."""

    def __init__(self, index, kb: SideCache, shard: KBShard) -> None:
        self.index, self.kb, self.shard = index, kb, shard
        self.size = shard.total
        self.device = cache_device(kb)

    def candidates(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Every slice's ``k`` best for every rank's queries, merged: this rank's queries' (scores, ids) [M, k]."""
        counts = D.gather_objects(len(queries))
        dim = queries.shape[1]
        here = min(k, self.shard.stop - self.shard.start)
        out = None
        for src in range(D.world()):
            mine = src == D.rank()
            q = D.broadcast_rows(queries.float() if mine else None, src, counts[src], (dim,), torch.float32, self.device)
            if here:
                values, ids = search(self.index, q, here)
                ids = torch.where(ids >= 0, ids + self.shard.start, ids)
            else:
                values, ids = torch.zeros(counts[src], 0), torch.zeros(counts[src], 0, dtype=torch.long)
            values, ids = _padded(values, ids, k)
            merged = _merge_best(values.to(self.device), ids.to(self.device), k)
            if mine:
                out = tuple(t.cpu() for t in merged)
        return out

    def rounds(self, steps: int) -> int:
        return max(D.gather_objects(steps))

    def rows(self, ids: Tensor) -> SideCache:
        """The cache rows of entities ``ids`` (any ranks' slices), in that order, fetched from their holders."""
        ids = ids.to(self.device)
        owners = self.shard.owners(ids)
        order = torch.argsort(owners, stable=True)
        send = torch.bincount(owners, minlength=D.world()).tolist()
        recv = D.exchange_counts(send, self.device)
        wanted = D.exchange_rows(ids[order], send, recv)  # the ids the other ranks want from this one
        held = self.kb.select(wanted - self.shard.start)
        out = {}
        for name, t in held.tensors.items():
            got = D.exchange_rows(t.to(self.device), recv, send)
            placed = torch.empty_like(got)
            placed[order] = got
            out[name] = placed
        return SideCache(out)
