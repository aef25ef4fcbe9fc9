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
from eval.sharded import KBShard
from model.export import load_export, save_export
from tests.support.helpers import free_port, run_bounded


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
