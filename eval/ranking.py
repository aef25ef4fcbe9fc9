"""Rank the gold entity of every mention against the whole KB.

* :func:`exact_ranks`: the full MMoE matcher against every entity. For each chunk of mentions the
  complete score row over the KB is built block by block (entity blocks sized so the attention
  tensor stays under ``max_pair_elements``), then ranks and top entities are read from that row,
  so the gold's score is compared with numbers computed the same way.
* :func:`two_stage_ranks`: a FAISS inner-product index over the separable part of the score
  (g2g vectors and the cross unit's vectors) retrieves the top-K candidates per mention, and the
  full matcher re-ranks them. A gold entity that is not retrieved gets rank N (the KB size):
  a miss at every cut-off, never flattering MR or MRR.

The KB cache may be compact (``eval.kb_cache``: bf16, fp16 or int8): each block is expanded to fp32
right after it is sliced or selected, so the whole KB is never expanded at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import Tensor

from eval.kb_cache import cache_device, expand, index_vectors
from eval.metrics import NonFiniteScoreError, gold_ranks
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


def _pair_cost(matcher: MMoEMatcher, mentions: SideCache, kb: SideCache) -> int:
    """Elements of the largest per-pair intermediate (the g2l attention map Lq x Lk)."""
    cost = 1
    for name in ("text", "vision"):
        if f"{name}.query" in kb:
            cost = max(cost, kb[f"{name}.query"].shape[1] * mentions[f"{name}.key"].shape[1])
    return cost


def exact_ranks(
    matcher: MMoEMatcher,
    mentions: SideCache,
    gold: Tensor,
    kb: SideCache,
    *,
    mention_chunk: int = 64,
    max_pair_elements: int = 1 << 26,
    bf16: bool = True,
) -> RankResult:
    """Ranks of ``gold`` (entity ids = KB rows) for every mention, against every KB entity."""
    n = len(kb)
    device = cache_device(kb)
    parts, bad = [], []
    for m0 in range(0, len(mentions), mention_chunk):
        ms = mentions.slice(m0, m0 + mention_chunk)
        entity_chunk = max(1, max_pair_elements // (len(ms) * _pair_cost(matcher, ms, kb)))
        row = torch.empty(len(ms), n, device=device)
        with torch.no_grad(), autocast_for(device, bf16):
            for e0 in range(0, n, entity_chunk):
                row[:, e0 : e0 + entity_chunk] = matcher.score(ms, expand(kb.slice(e0, e0 + entity_chunk)))["overall"].float()
        try:
            rank, ties = gold_ranks(row, gold[m0 : m0 + mention_chunk].to(device))
        except NonFiniteScoreError as err:  # positions in this chunk -> positions in ``mentions``; go on to count all
            bad.extend(m0 + r for r in err.rows)
            continue
        top = row.topk(min(TOP_SAVED, n), dim=1)
        parts.append(RankResult(rank.cpu(), ties.cpu(), top.indices.cpu(), top.values.cpu()))
    if bad:
        raise NonFiniteScoreError(f"{len(bad)} mention(s) got a NaN or inf score (positions {bad[:5]})", bad)
    return RankResult.cat(parts)


def build_index(vectors: Tensor, kind: str = "flat", nlist: int = 1024, m: int = 16, use_gpu: bool | None = None):
    """FAISS inner-product index: exact ``flat`` by default; ``ivf`` / ``ivfpq`` for millions of
    entities. GPU when faiss reports GPUs (faiss-gpu), CPU otherwise."""
    x = np.ascontiguousarray(vectors.float().cpu().numpy())
    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind in ("ivf", "ivfpq"):
        quantizer = faiss.IndexFlatIP(d)
        nlist = max(1, min(nlist, x.shape[0] // 39))  # FAISS wants ~39 training points per list
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(nlist, 32)
    else:
        raise ValueError(f"unknown index kind {kind!r}; use flat, ivf or ivfpq")
    if use_gpu is None:
        use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def search(index, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    scores, ids = index.search(np.ascontiguousarray(queries.float().cpu().numpy()), k)
    return torch.from_numpy(scores), torch.from_numpy(ids).long()


def two_stage_ranks(
    matcher: MMoEMatcher,
    mentions: SideCache,
    gold: Tensor,
    kb: SideCache,
    *,
    top_k: int = 100,
    index=None,
    pair_chunk: int = 4096,
    bf16: bool = True,
) -> RankResult:
    """Retrieve ``top_k`` candidates per mention with FAISS, re-rank them with the full matcher."""
    n = len(kb)
    k = min(top_k, n)
    if index is None:
        index = build_index(index_vectors(matcher, kb))
    _, cand = search(index, matcher.separable_vectors(mentions), k)  # [M, k]
    device = cache_device(kb)
    m_count = len(mentions)
    rows = torch.arange(m_count).repeat_interleave(k)
    flat = cand.reshape(-1)
    scores = torch.empty(m_count * k)
    with torch.no_grad(), autocast_for(device, bf16):
        for p0 in range(0, rows.numel(), pair_chunk):
            r, c = rows[p0 : p0 + pair_chunk], flat[p0 : p0 + pair_chunk]
            scores[p0 : p0 + pair_chunk] = matcher.score_pairs(mentions.select(r.to(device)), expand(kb.select(c.to(device))))[
                "overall"].float().cpu()
    scores = scores.view(m_count, k)
    hit = cand == gold.view(-1, 1).cpu()
    found = hit.any(dim=1)
    gold_col = hit.float().argmax(dim=1)
    rank, ties = gold_ranks(scores, gold_col)
    rank = torch.where(found, rank, torch.full_like(rank, n))
    ties = torch.where(found, ties, torch.zeros_like(ties))
    top = scores.topk(min(TOP_SAVED, k), dim=1)
    return RankResult(rank, ties, cand.gather(1, top.indices), top.values, found)


def recall_at(index, matcher: MMoEMatcher, mentions: SideCache, gold: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """First-stage recall@K (percent) of the gold entity, for several K, from one search."""
    kmax = min(max(ks), index.ntotal)
    _, cand = search(index, matcher.separable_vectors(mentions), kmax)
    hit = cand == gold.view(-1, 1).cpu()
    return {f"recall@{k}": 100.0 * hit[:, : min(k, kmax)].any(dim=1).double().mean().item() for k in ks}
