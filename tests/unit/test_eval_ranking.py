"""Whole-KB ranking: metrics by hand, exact mode vs a naive pair loop, two-stage vs exact."""

import math

import torch

from eval.metrics import gold_ranks, summarize
from eval.ranking import build_index, exact_ranks, recall_at, two_stage_ranks
from model.mmoe import MMoEModel
from moe.features import SideCache
from tests.support.helpers import random_batch, take, tiny_model_config


def test_ranks_count_strictly_higher_scores_and_report_ties():
    scores = torch.tensor([
        [0.9, 0.5, 0.1, 0.3],   # gold 0 is best -> rank 1
        [0.2, 0.7, 0.7, 0.7],   # gold 1 ties with two others -> rank 1, 2 ties
        [0.1, 0.4, 0.2, 0.3],   # gold 2: 0.4 and 0.3 above -> rank 3
    ])
    rank, ties = gold_ranks(scores, torch.tensor([0, 1, 2]))
    assert rank.tolist() == [1, 1, 3]
    assert ties.tolist() == [0, 2, 0]


def test_metrics_match_hand_computed_values():
    ranks = torch.tensor([1, 2, 4, 7, 15, 30])
    m = summarize(ranks, torch.tensor([0, 0, 1, 0, 0, 3]))
    assert math.isclose(m["H@1"], 100 / 6)
    assert math.isclose(m["H@3"], 200 / 6)
    assert math.isclose(m["H@5"], 300 / 6)
    assert math.isclose(m["H@10"], 400 / 6)
    assert math.isclose(m["H@20"], 500 / 6)
    assert math.isclose(m["MRR"], 100 * (1 + 1 / 2 + 1 / 4 + 1 / 7 + 1 / 15 + 1 / 30) / 6)
    assert math.isclose(m["MR"], (1 + 2 + 4 + 7 + 15 + 30) / 6)
    assert m["mentions"] == 6 and m["ties_total"] == 4 and m["mentions_with_ties"] == 2


def _sides(n_mentions=6, n_entities=23):
    torch.manual_seed(0)
    model = MMoEModel(tiny_model_config()).eval()
    mentions, entities = random_batch(n_mentions, 21, missing=(1,)), random_batch(n_entities, 22, missing=(3, 9))
    with torch.no_grad():
        m_side, _ = model.mention_side(mentions)
        kb = SideCache.cat([model.entity_side(take(entities, slice(s, s + 5)))[0] for s in range(0, n_entities, 5)])
    gold = torch.tensor([0, 5, 7, 22, 13, 5])
    return model, mentions, entities, m_side, kb, gold


def test_exact_ranks_equal_a_naive_pair_loop():
    model, mentions, entities, m_side, kb, gold = _sides()
    # Tiny budget: many entity blocks and mention chunks of 4 must not change anything.
    result = exact_ranks(model.matcher, m_side, gold, kb, mention_chunk=4, max_pair_elements=4 * 17 * 17 * 3)
    naive = torch.empty(6, 23)
    with torch.no_grad():
        for i in range(6):
            for j in range(23):
                naive[i, j] = model(take(mentions, [i]), take(entities, [j]))[0]["overall"][0, 0]
    rank, ties = gold_ranks(naive, gold)
    assert result.rank.tolist() == rank.tolist()
    assert result.ties.tolist() == ties.tolist()
    assert result.top_ids[:, 0].tolist() == naive.argmax(1).tolist()
    torch.testing.assert_close(result.top_scores, naive.topk(5, dim=1).values, rtol=1e-4, atol=1e-4)


def test_two_stage_with_k_equal_to_kb_size_equals_exact():
    model, _, _, m_side, kb, gold = _sides()
    exact = exact_ranks(model.matcher, m_side, gold, kb)
    two = two_stage_ranks(model.matcher, m_side, gold, kb, top_k=len(kb), pair_chunk=7)
    assert two.rank.tolist() == exact.rank.tolist()
    assert two.candidate_recall.all()
    assert two.top_ids.tolist() == exact.top_ids.tolist()


def test_two_stage_misses_get_the_worst_rank_and_recall_is_reported():
    model, _, _, m_side, kb, gold = _sides()
    index = build_index(model.matcher.separable_vectors(kb))
    two = two_stage_ranks(model.matcher, m_side, gold, kb, top_k=2, index=index)
    rec = recall_at(index, model.matcher, m_side, gold, (2, 23))
    assert rec["recall@23"] == 100.0
    assert math.isclose(rec["recall@2"], 100.0 * two.candidate_recall.double().mean().item())
    missed = ~two.candidate_recall
    assert torch.all(two.rank[missed] == len(kb))
    assert torch.all(two.rank[~missed] <= 2)


def test_pooled_cross_attention_equals_the_per_pair_computation():
    """global_to_local (one GEMM with the key mask folded in as an extra column, the mean over
    entity tokens before the value product) against the textbook computation, pair by pair:
    masked keys dropped, softmax, value product, mean over the entity's real tokens."""
    from moe.units import global_to_local, global_to_local_paired

    g = torch.Generator().manual_seed(3)
    n, m, lq, lk, h = 5, 4, 7, 6, 16
    query, key, value = (torch.randn(n, lq, h, generator=g), torch.randn(m, lk, h, generator=g),
                         torch.randn(m, lk, h, generator=g))
    query_mask = torch.arange(lq)[None] < torch.tensor([7, 1, 4, 5, 3])[:, None]
    key_mask = torch.arange(lk)[None] < torch.tensor([6, 2, 1, 4])[:, None]
    key = key.masked_fill(~key_mask[..., None], 1e3)  # padding holds large junk: it must not leak in
    out = global_to_local(query, query_mask, key, value, key_mask)
    assert out.shape == (m, n, h)
    for i in range(m):
        keep = key_mask[i]
        for j in range(n):
            q = query[j][query_mask[j]]  # the entity's real tokens
            attn = torch.softmax(q @ key[i][keep].t() / math.sqrt(h), dim=-1)
            expected = (attn @ value[i][keep]).mean(0)
            torch.testing.assert_close(out[i, j], expected, rtol=1e-5, atol=1e-6)
    pairs = global_to_local_paired(query[[0, 3]], query_mask[[0, 3]], key[[2, 1]], value[[2, 1]], key_mask[[2, 1]])
    torch.testing.assert_close(pairs, torch.stack([out[2, 0], out[1, 3]]), rtol=1e-5, atol=1e-6)


def test_exact_ranks_do_not_depend_on_the_block_shape():
    """The automatic block (eval.max_pair_elements: 0) and a tiny one give identical fp32 ranks."""
    model, _, _, m_side, kb, gold = _sides()
    auto = exact_ranks(model.matcher, m_side, gold, kb, max_pair_elements=0)
    tiny = exact_ranks(model.matcher, m_side, gold, kb, mention_chunk=1, max_pair_elements=1)
    assert auto.rank.tolist() == tiny.rank.tolist()
    torch.testing.assert_close(auto.top_scores, tiny.top_scores, rtol=1e-6, atol=1e-6)


def test_candidate_scoring_equals_the_full_score_matrix_at_the_candidates():
    model, _, _, m_side, kb, _ = _sides()
    g = torch.Generator().manual_seed(1)
    cand = torch.stack([torch.randperm(len(kb), generator=g)[:4] for _ in range(len(m_side))])  # [M, 4]
    with torch.no_grad():
        full = model.matcher.score(m_side, kb)
        grouped = model.matcher.score_candidates(m_side, kb.select(cand.reshape(-1)))
    for unit in ("text", "vision", "cross", "overall"):
        torch.testing.assert_close(grouped[unit], full[unit].gather(1, cand), rtol=1e-5, atol=1e-5, msg=unit)


def test_two_stage_ignores_the_padding_of_an_index_that_finds_fewer_than_k():
    """FAISS pads with -1 when it has fewer than k results; a padded slot must never be scored as
    the KB's last row, nor outrank a real candidate."""
    model, _, _, m_side, kb, gold = _sides()
    small = build_index(model.matcher.separable_vectors(kb.slice(0, 6)))  # entities 0..5 only
    two = two_stage_ranks(model.matcher, m_side, gold, kb, top_k=10, index=small)
    inside = gold < 6
    assert inside.any() and (~inside).any()
    exact = exact_ranks(model.matcher, m_side.select(inside.nonzero().flatten()), gold[inside], kb.slice(0, 6))
    assert two.rank[inside].tolist() == exact.rank.tolist()
    assert (two.rank[~inside] == len(kb)).all()
    assert (two.top_ids < 6).all()
