"""The KB sharded across ranks at evaluation (eval/sharded.py): the ranks, ties and top entities equal the
gathered path's, on 2 and 3 processes (a KB of 200 entities: slices of 128 and 72, and an empty one)."""

import pytest
import torch

from eval.ranking import (
    FLAT_MAX,
    KB_ALIGN,
    best_first,
    block_rows,
    build_index,
    index_kind,
    score_against_kb,
    slice_align,
    top_entities,
)
from eval.sharded import KBShard
from model.config import ConfigError, EvalConfig
from model.mmoe import MMoEModel
from tests.support.helpers import random_batch, tiny_model_config


def _reference_top(row: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best by (score descending, id ascending), by a full sort of (-score, id)."""
    keys = [sorted(range(row.shape[1]), key=lambda j, r=r: (-float(r[j]), j))[:k] for r in row]
    ids = torch.tensor(keys)
    return row.gather(1, ids), ids


def test_top_entities_of_slices_merge_to_the_whole_rows_even_with_many_ties():
    g = torch.Generator().manual_seed(0)
    row = torch.randint(0, 4, (6, 50), generator=g).float()  # 4 distinct values: ties everywhere, at the cut too
    row[0] = 1.0  # a row of one value
    want_scores, want_ids = _reference_top(row, 5)
    scores, ids = top_entities(row, 5)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    for cuts in ([0, 32, 50], [0, 7, 7, 30, 50], [0, 50, 50]):  # slices, an empty one among them
        parts = [top_entities(row[:, a:b], min(5, b - a)) for a, b in zip(cuts, cuts[1:], strict=False)]
        merged = best_first(torch.cat([s for s, _ in parts], 1),
                            torch.cat([i + a for (_, i), a in zip(parts, cuts, strict=False)], 1), 5)
        assert torch.equal(merged[1], want_ids) and torch.equal(merged[0], want_scores), cuts


def test_slices_are_aligned_to_the_largest_scoring_block_and_cover_the_kb():
    for n, world in ((200, 2), (200, 3), (1, 2), (10**6, 2), (10**6, 7), (1025, 2)):
        shard = KBShard.of(n, world, 0)
        assert shard.ranges[0][0] == 0 and shard.ranges[-1][1] == n
        assert all(b == c for (_, b), (c, _) in zip(shard.ranges, shard.ranges[1:], strict=False))
        assert all(a % shard.align == 0 for a, b in shard.ranges if a < b)
        assert shard.align & (shard.align - 1) == 0 and shard.align <= KB_ALIGN
        assert torch.equal(shard.owners(torch.arange(n)),
                           torch.cat([torch.full((b - a,), r) for r, (a, b) in enumerate(shard.ranges)]))
    assert slice_align(200, 2) == 128 and KBShard.of(200, 3, 0).ranges == ((0, 128), (128, 200), (200, 200))
    assert all(block_rows(1 << 14, m, 7) in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) for m in (1, 3, 64))


def test_a_slice_starting_at_a_multiple_of_the_alignment_scores_bit_identically_to_the_whole_kb():
    """Block shapes change the last bits of the scores (seen on our CPUs for slices cut at 77 of 200): a slice
    that starts at a multiple of its alignment is scored in the whole KB's blocks, so its scores are equal."""
    torch.manual_seed(0)
    model = MMoEModel(tiny_model_config()).eval()
    with torch.no_grad():
        kb = model.entity_side(random_batch(200, 22, missing=(3, 9)))[0]
        mentions = model.mention_side(random_batch(16, 21, missing=(1,)))[0]
    align = slice_align(200, 2)
    for m in (16, 5):
        whole = score_against_kb(model.matcher, mentions.slice(0, m), kb, 1 << 13, False, align)
        for a, b in KBShard.of(200, 2, 0).ranges:
            assert torch.equal(score_against_kb(model.matcher, mentions.slice(0, m), kb.slice(a, b), 1 << 13, False, align),
                               whole[:, a:b])


def test_the_auto_index_is_flat_up_to_its_threshold_and_ivf_above_with_the_given_nprobe():
    assert index_kind("auto", FLAT_MAX) == "flat" and index_kind("auto", FLAT_MAX + 1) == "ivf"
    assert index_kind("ivfpq", 10) == "ivfpq"
    with pytest.raises(ValueError, match="unknown index kind 'hnsw'"):
        index_kind("hnsw", 10)
    vectors = torch.randn(40000, 8, generator=torch.Generator().manual_seed(0))
    ivf = build_index(vectors, "ivf", nprobe=5)
    assert ivf.nlist == int(4 * 40000 ** 0.5) and ivf.nprobe == 5
    assert build_index(vectors, "ivf", nlist=20, nprobe=64).nprobe == 20  # never more lists than there are
    with pytest.raises(ConfigError, match="eval.index"):
        EvalConfig(index="hnsw")
