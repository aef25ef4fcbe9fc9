"""Rank the gold entity of every mention against the whole KB.

* :func:`exact_ranks`: the full MMoE matcher against every entity. For each chunk of mentions the
  complete score row over the KB is built block by block (entity blocks sized so the attention
  tensor stays under ``max_pair_elements``), then ranks and top entities are read from that row,
  so the gold's score is compared with numbers computed the same way.
* :func:`two_stage_ranks`: a FAISS inner-product index over the separable part of the score
  (g2g vectors and the cross unit's vectors) retrieves the top-K candidates per mention, and the
  full matcher re-ranks them. A gold entity that is not retrieved gets rank N (the KB size):
  a miss at every cut-off, never flattering MR or MRR.

The KB cache may be compact (``eval.cache_dtype``: bf16, fp16 or int8): each block is expanded to fp32
right after it is sliced or selected, so the whole KB is never expanded at once.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import Tensor

from eval.kb_cache import cache_device, expand, index_vectors
from eval.metrics import NonFiniteScoreError, gold_ranks
from model.config import INDEX_KINDS
from moe.features import SideCache
from moe.matcher import MMoEMatcher

TOP_SAVED = 5


@dataclass
class RankResult:
    rank: Tensor  # [M] long
    ties: Tensor  # [M] long: entities with exactly the gold's score
    top_ids: Tensor  # [M, 5] best entity ids
    top_scores: Tensor  # [M, 5]
    candidate_recall: Tensor | None = None  # [M] bool: gold among the first-stage candidates

    @staticmethod
    def cat(parts: list[RankResult]) -> RankResult:
        recall = None if parts[0].candidate_recall is None else torch.cat([p.candidate_recall for p in parts])
        return RankResult(torch.cat([p.rank for p in parts]), torch.cat([p.ties for p in parts]),
                          torch.cat([p.top_ids for p in parts]), torch.cat([p.top_scores for p in parts]), recall)


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on GPUs that support it; fp32 elsewhere (bf16 is slow on our CPUs)."""
    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


CPU_PAIR_BUDGET = 1 << 22  # 16 MiB of fp32 attention map: within the last-level cache of our CPUs
GPU_PAIR_BUDGET = 1 << 28  # GPUs: few large kernels; 512 MiB in bf16 per map


def pair_budget(max_pair_elements: int, device: torch.device) -> int:
    """Attention-map elements per scoring block: ``max_pair_elements``, or when 0 the automatic size.

    On CPUs the map is written by the GEMM, read and rewritten by the softmax and read by the
    pooling; when it stays in the last-level cache the scoring runs about twice as fast as with
    a map streamed through memory (bench.bench_eval --max-pair-elements; figures in docs/benchmarks.md).
    GPUs prefer fewer, larger kernels."""
    if max_pair_elements > 0:
        return max_pair_elements
    return GPU_PAIR_BUDGET if device.type == "cuda" else CPU_PAIR_BUDGET


def _pair_cost(matcher: MMoEMatcher, mentions: SideCache, kb: SideCache) -> int:
    """Elements of the largest per-pair intermediate (the g2l attention map Lq x Lk)."""
    cost = 1
    for name in ("text", "vision"):
        if f"{name}.query" in kb:
            cost = max(cost, kb[f"{name}.query"].shape[1] * mentions[f"{name}.key"].shape[1])
    return cost


KB_ALIGN = 1024  # the largest scoring block, and what every rank's KB slice starts at a multiple of


def slice_align(n: int, world: int) -> int:
    """Rows every rank's KB slice starts at a multiple of (eval/sharded.py): a power of two, KB_ALIGN at most,
    small enough that ``world`` ranks share an ``n``-entity KB about evenly."""
    per_rank = max(1, -(-n // world))
    return min(KB_ALIGN, 1 << (per_rank - 1).bit_length())


def block_rows(budget: int, mentions: int, pair_cost: int, cap: int = KB_ALIGN) -> int:
    """Entities per scoring block: the largest power of two whose attention map stays within ``budget``
    elements, at most ``cap`` (a power of two). Blocks then start at multiples of their size, so a KB slice
    that starts at a multiple of ``cap`` is scored in exactly the blocks of the whole KB: scores are
    bit-identical whether the KB is scored whole or slice by slice (block shapes change the last bits)."""
    fit = max(1, budget // (mentions * pair_cost))
    return min(cap, 1 << (fit.bit_length() - 1))


def score_against_kb(matcher: MMoEMatcher, mentions: SideCache, kb: SideCache, max_pair_elements: int = 0,
                     bf16: bool = True, align: int = KB_ALIGN) -> Tensor:
    """Overall scores [M, N] of a chunk of mentions against every KB entity, block by block: each
    block holds at most ``max_pair_elements`` attention-map elements (0: :func:`pair_budget`) and
    ``align`` entities (:func:`block_rows`)."""
    n, device = len(kb), cache_device(kb)
    row = torch.empty(len(mentions), n, device=device)
    if not n:
        return row
    entity_chunk = block_rows(pair_budget(max_pair_elements, device), len(mentions),
                              _pair_cost(matcher, mentions, kb), align)
    with torch.no_grad(), autocast_for(device, bf16):
        for e0 in range(0, n, entity_chunk):
            row[:, e0 : e0 + entity_chunk] = matcher.score(mentions, expand(kb.slice(e0, e0 + entity_chunk)))["overall"].float()
    return row


def best_first(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of each row's (value, id) pairs [M, C], best first: higher value first, and among equal
    values the lower id (one order whatever the pairs' order, so a merge of slices' lists matches the whole)."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), ids.gather(1, by_value)


def top_entities(row: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best entities of each score row [M, N] as (scores, columns), in :func:`best_first` order:
    torch.topk leaves the order of equal scores, and which of them make the cut, to the kernel."""
    if k == 0:
        return row[:, :0], torch.zeros(len(row), 0, dtype=torch.long, device=row.device)
    kth = row.topk(k, dim=1).values[:, -1:]
    take = row >= kth  # k entities per row, more where several share the k-th score
    extra = take.sum(dim=1) - k
    for i in torch.nonzero(extra > 0).flatten().tolist():  # rare: keep the lowest ids among the k-th score's
        at = torch.nonzero(row[i] == kth[i]).flatten()
        take[i, at[len(at) - int(extra[i]):]] = False
    cols = torch.nonzero(take)[:, 1].view(len(row), k)
    return best_first(row.gather(1, cols), cols, k)


def exact_ranks(
    matcher: MMoEMatcher,
    mentions: SideCache,
    gold: Tensor,
    kb: SideCache,
    *,
    mention_chunk: int = 64,
    max_pair_elements: int = 0,
    bf16: bool = True,
    align: int = KB_ALIGN,
) -> RankResult:
    """Ranks of ``gold`` (entity ids = KB rows) for every mention, against every KB entity.
    ``max_pair_elements``: attention-map elements per block (0: :func:`pair_budget`'s choice); ``align``:
    the largest block (:func:`block_rows`; :func:`slice_align` of the KB size and world, so that the scores
    equal the sharded path's, eval/sharded.py)."""
    n = len(kb)
    device = cache_device(kb)
    parts, bad = [], []
    for m0 in range(0, len(mentions), mention_chunk):
        row = score_against_kb(matcher, mentions.slice(m0, m0 + mention_chunk), kb, max_pair_elements, bf16, align)
        try:
            rank, ties = gold_ranks(row, gold[m0 : m0 + mention_chunk].to(device))
        except NonFiniteScoreError as err:  # positions in this chunk -> positions in ``mentions``; go on to count all
            bad.extend(m0 + r for r in err.rows)
            continue
        top_scores, top_ids = top_entities(row, min(TOP_SAVED, n))
        parts.append(RankResult(rank.cpu(), ties.cpu(), top_ids.cpu(), top_scores.cpu()))
    if bad:
        raise NonFiniteScoreError(f"{len(bad)} mention(s) got a NaN or inf score (positions {bad[:5]})", bad)
    return RankResult.cat(parts)


class Clock:
    """Seconds between calls, waiting for the GPU's queued work first."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        lapsed, self.last = now - self.last, now
        return lapsed


FLAT_MAX = 1 << 18  # index "auto": exact flat search up to this many entities, IVF above


def index_kind(kind: str, entities: int) -> str:
    """The FAISS index ``kind`` resolved for a KB of ``entities``: ``auto`` is flat up to FLAT_MAX, ivf above
    (a flat search of a million entities costs every query a pass over all of them)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        return "flat" if entities <= FLAT_MAX else "ivf"
    return kind


def build_index(vectors: Tensor, kind: str = "flat", nlist: int = 0, m: int = 16, use_gpu: bool | None = None,
                nprobe: int = 32):
    """FAISS inner-product index: exact ``flat``; ``ivf`` / ``ivfpq`` for millions of entities (``nlist``
    lists, 0: 4 sqrt(N), FAISS's rule of thumb; ``nprobe`` of them searched per query); ``auto``:
    :func:`index_kind`. GPU when faiss reports GPUs (faiss-gpu), CPU otherwise."""
    x = np.ascontiguousarray(vectors.float().cpu().numpy())
    n, d = x.shape
    kind = index_kind(kind, n)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        nlist = max(1, min(nlist or int(4 * n ** 0.5), n // 39))  # FAISS wants ~39 training points per list
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = max(1, min(nlist, nprobe))
    if use_gpu is None:
        use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def kb_index(matcher: MMoEMatcher, kb: SideCache, kind: str = "flat", rows: int = 0, *, entities: int | None = None,
             nlist: int = 0, nprobe: int = 32):
    """The FAISS index over the KB's separable vectors. A non-finite vector would make FAISS return
    padding or junk instead of a NaN score, so it raises NonFiniteScoreError for all ``rows`` mentions
    (in exact mode such an entity gives every mention a non-finite score too). ``entities``: the whole KB's
    size when ``kb`` is one slice of it (an ``auto`` index is chosen by the whole KB's size)."""
    vectors = index_vectors(matcher, kb)
    finite = torch.isfinite(vectors).all(dim=1)
    if not bool(finite.all()):
        ids = torch.nonzero(~finite).flatten().tolist()
        raise NonFiniteScoreError(f"{len(ids)} KB entities have NaN or inf vectors (entities {ids[:5]})", list(range(rows)))
    return build_index(vectors, index_kind(kind, len(kb) if entities is None else entities), nlist=nlist, nprobe=nprobe)


def search(index, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    scores, ids = index.search(np.ascontiguousarray(queries.float().cpu().numpy()), k)
    return torch.from_numpy(scores), torch.from_numpy(ids).long()


class LocalCandidates:
    """First-stage candidates from one FAISS index over the whole KB, and their rows from the whole cache
    (eval/sharded.py: the same over a KB sharded across ranks)."""

    def __init__(self, index, kb: SideCache | None = None) -> None:
        self.index, self.kb = index, kb
        self.size = index.ntotal if kb is None else len(kb)  # the KB's size: a miss ranks there

    def candidates(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """First-stage (scores, entity ids) [M, k] of ``queries``, best first (:func:`best_first`); id -1
        where the index found fewer than k (IVF)."""
        scores, ids = search(self.index, queries, k)
        return best_first(scores, ids, k)

    def rounds(self, steps: int) -> int:
        """Re-ranking steps every rank runs (sharded: the most any rank needs; the row fetch is collective)."""
        return steps

    def rows(self, ids: Tensor) -> SideCache:
        """The cache rows of entities ``ids``, in that order."""
        return self.kb.select(ids.to(cache_device(self.kb)))


def two_stage_ranks(
    matcher: MMoEMatcher,
    mentions: SideCache,
    gold: Tensor,
    kb: SideCache | None,
    *,
    top_k: int = 100,
    index=None,
    pair_chunk: int = 4096,
    bf16: bool = True,
    timings: dict[str, float] | None = None,
    source: LocalCandidates | None = None,
) -> RankResult:
    """Retrieve ``top_k`` candidates per mention with FAISS, re-rank them with the full matcher.
    ``source``: where candidates and their rows come from (default: ``index``, or one built here, over
    ``kb``; eval/sharded.py passes the KB sharded across ranks). ``timings`` (optional) receives the seconds
    of each stage: index_s (0 when ``index`` or ``source`` is given), search_s, rerank_s."""
    device = cache_device(mentions)
    clock = Clock(device)
    if source is None:
        source = LocalCandidates(kb_index(matcher, kb, rows=len(mentions)) if index is None else index, kb)
    index_s = clock.lap()
    n = source.size
    k = min(top_k, n)
    queries = matcher.separable_vectors(mentions)
    bad = ~torch.isfinite(queries).all(dim=1).cpu()  # FAISS would silently return -1 or junk for these
    _, cand = source.candidates(queries, k)  # [M, k]
    search_s = clock.lap()
    m_count = len(mentions)
    missing = cand < 0  # FAISS pads with -1 when an (IVF) index finds fewer than k
    rows = cand.clamp_min(0)
    scores = torch.empty(m_count, k)
    group = max(1, pair_chunk // k)  # mentions re-ranked together: about pair_chunk pairs per call
    with torch.no_grad(), autocast_for(device, bf16):
        for step in range(source.rounds(-(-m_count // group))):
            m0 = step * group
            picked = source.rows(rows[m0 : m0 + group].reshape(-1))  # empty once this rank's mentions are done
            if len(picked):
                scores[m0 : m0 + group] = matcher.score_candidates(mentions.slice(m0, m0 + group),
                                                                   expand(picked))["overall"].float().cpu()
    scores = scores.masked_fill(missing, torch.finfo(scores.dtype).min)  # below every real score, never a winner
    scores[bad] = float("nan")  # gold_ranks names these rows
    if timings is not None:
        timings.update(index_s=index_s, search_s=search_s, rerank_s=clock.lap())
    hit = cand == gold.view(-1, 1).cpu()
    found = hit.any(dim=1)
    gold_col = hit.float().argmax(dim=1)
    rank, ties = gold_ranks(scores, gold_col)
    rank = torch.where(found, rank, torch.full_like(rank, n))
    ties = torch.where(found, ties, torch.zeros_like(ties))
    top_scores, top_ids = best_first(scores, cand, min(TOP_SAVED, k))
    return RankResult(rank, ties, top_ids, top_scores, found)


def recall_at(source, matcher: MMoEMatcher, mentions: SideCache, gold: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """First-stage recall@K (percent) of the gold entity, for several K, from one search. ``source``: a FAISS
    index over the whole KB, or a candidate source (:class:`LocalCandidates`, eval/sharded.py)."""
    if not hasattr(source, "candidates"):
        source = LocalCandidates(source)
    kmax = min(max(ks), source.size)
    _, cand = source.candidates(matcher.separable_vectors(mentions), kmax)
    hit = cand == gold.view(-1, 1).cpu()
    return {f"recall@{k}": 100.0 * hit[:, : min(k, kmax)].any(dim=1).double().mean().item() for k in ks}
