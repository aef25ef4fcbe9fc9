"""Whole-KB ranking: metrics by hand, exact mode vs a naive pair loop, two-stage vs exact."""

import math

import torch

from eval.metrics import gold_ranks, summarize
from eval.ranking import build_index, exact_ranks, recall_at, two_stage_ranks
from model.mmoe import MMoEModel
from moe.features import SideCache
from tests.helpers import random_batch, take, tiny_model_config


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
