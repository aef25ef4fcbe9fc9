"""The KB sharded across ranks at evaluation (eval/sharded.py): the ranks, ties and top entities equal the
gathered path's, on 2 and 3 processes (a KB of 200 entities: slices of 128 and 72, and an empty one)."""

import json
import os
import shutil
import sys

import pytest
import torch

from data_shards.folder import ShardFolder
from eval.kb_cache import cache_path
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
from model.export import load_export, save_export
from model.mmoe import MMoEModel
from tests.helpers import free_port, random_batch, run_bounded, tiny_model_config


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


def _evaluate(export, out, nproc, mode, sharding, *settings):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "eval.evaluate", "--checkpoint", str(export), "--out", str(out), "--split", "test", "--mode", mode,
           "--set", f"eval.kb_sharding={sharding}", *[x for s in settings for x in ("--set", s)]]
    proc = run_bounded(cmd, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results-test.json").read_text())
    per = [json.loads(line) for line in open(out / "per_mention-test.jsonl")]
    return results, [(r["index"], r["rank"], r["ties"], r["top_ids"], r["top_scores"]) for r in per], proc.stdout


@pytest.fixture(scope="module")
def tied_export(tiny_export, tmp_path_factory):
    """The tiny export with every matcher weight zero: every entity gets the same score (199 ties per mention)."""
    model, cfg = load_export(tiny_export)
    with torch.no_grad():
        for p in model.matcher.parameters():
            p.zero_()
    return save_export(model, cfg, tmp_path_factory.mktemp("tied") / "best")


@pytest.mark.parametrize("mode,nproc,tied", [("exact", 2, False), ("two-stage", 2, False), ("exact", 3, True)],
                         ids=["exact-2", "two-stage-2", "exact-3-tied"])
def test_sharded_evaluation_equals_gathered_rank_for_rank_tie_for_tie(mode, nproc, tied, tiny_export, tied_export,
                                                                       tiny_shards, tmp_path):
    export = shutil.copytree(tied_export if tied else tiny_export, tmp_path / "best",
                             ignore=shutil.ignore_patterns("kb_cache-*"))
    settings = ["eval.top_k=20", "eval.recall_at=[1,10,20]"] if mode == "two-stage" else []
    gathered, g_rows, _ = _evaluate(export, tmp_path / "gathered", nproc, mode, "gathered", "eval.save_kb_cache=false",
                                    *settings)
    sharded, s_rows, out = _evaluate(export, tmp_path / "sharded", nproc, mode, "sharded", *settings)
    assert s_rows == g_rows  # ranks, ties, top-5 ids and scores, every mention
    for k, v in gathered["metrics"].items():
        if k != "mentions_per_s":
            assert sharded["metrics"][k] == v, k
    kb = ShardFolder(tiny_shards).shard_set("kb").total
    ranges = KBShard.of(kb, nproc, 0).ranges
    cache = sharded["kb_cache"]
    assert cache["sharding"] == "sharded" and cache["state"] == "built" and cache["rows"] == list(ranges[0])
    assert gathered["kb_cache"]["sharding"] == "gathered"
    assert len(sharded["peak_rss_bytes_per_rank"]) == nproc and min(sharded["peak_rss_bytes_per_rank"]) > 2**20
    per_row = gathered["kb_cache"]["bytes"] / kb  # each rank holds its slice's rows only
    assert cache["bytes_per_rank"] == [round(per_row * (b - a)) for a, b in ranges]
    if tied:
        assert sharded["metrics"]["ties_total"] == (kb - 1) * sharded["metrics"]["mentions"]
        assert ranges[-1][0] == ranges[-1][1]  # the third rank's slice is empty
        assert all(top == [0, 1, 2, 3, 4] for _, _, _, top, _ in s_rows)  # lowest ids first among equal scores
    # Saved per slice (not for the empty one), and reused by a second run.
    files = sorted(p.name for p in export.glob("kb_cache-*"))
    key = cache["path"].rsplit("kb_cache-", 1)[1][:16]
    assert files == sorted(cache_path(export, key, r).name for r in ranges if r[0] < r[1])
    again, a_rows, out = _evaluate(export, tmp_path / "again", nproc, mode, "sharded", *settings)
    assert again["kb_cache"]["state"] == "reused" and a_rows == g_rows
    assert f"entity cache reused, sharded over {nproc} ranks" in out


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
