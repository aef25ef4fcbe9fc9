"""The evaluation command end to end on the tiny synthetic benchmark, one and two processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from data_shards.folder import ShardFolder
from eval.evaluate import main
from tests.support.helpers import free_port


def read_ranks(out_dir, split="test"):
    return [json.loads(line) for line in open(out_dir / f"per_mention-{split}.jsonl")]


def test_cli_writes_results_per_mention_and_leaderboard(tiny_export, tmp_path, tiny_shards, capsys):
    main(["--checkpoint", str(tiny_export), "--out", str(tmp_path), "--split", "test", "--name", "tiny"])
    results = json.loads((tmp_path / "results-test.json").read_text())
    n = ShardFolder(tiny_shards).shard_set("test").total
    assert results["metrics"]["mentions"] == n and results["metrics"]["kb_size"] == 200
    assert len(results["manifest_sha256"]) == 64 and results["checkpoint"] == str(tiny_export)
    per = read_ranks(tmp_path)
    assert sorted(r["index"] for r in per) == list(range(n))
    assert all(r["mention_id"].startswith("synth-test-") for r in per)
    assert all(1 <= r["rank"] <= 200 and len(r["top_ids"]) == 5 for r in per)
    assert all(r["top_ids"][0] == r["gold"] for r in per if r["rank"] == 1 and r["ties"] == 0)
    board = (tmp_path / "leaderboard-test.md").read_text()
    assert "**tiny**" in board and "No published numbers for synthetic" in board
    out = capsys.readouterr().out
    assert "[eval test] H@1" in out


def test_two_stage_with_k_equal_to_kb_equals_exact_end_to_end(tiny_export, tmp_path):
    main(["--checkpoint", str(tiny_export), "--out", str(tmp_path / "exact"), "--split", "dev"])
    main(["--checkpoint", str(tiny_export), "--out", str(tmp_path / "two"), "--split", "dev", "--mode", "two-stage",
          "--set", "eval.top_k=200", "--set", "eval.recall_at=[1,10,200]"])
    exact, two = read_ranks(tmp_path / "exact", "dev"), read_ranks(tmp_path / "two", "dev")
    assert [r["rank"] for r in exact] == [r["rank"] for r in two]
    recall = json.loads((tmp_path / "two" / "results-dev.json").read_text())["metrics"]
    assert recall["recall@200"] == 100.0 and recall["recall@1"] <= recall["recall@10"]


def test_two_processes_give_the_same_numbers_as_one(tiny_export, tmp_path):
    # One process keeps its cache in memory; two processes encode the KB on both ranks and save it from
    # rank 0 (on a copy: no saved cache is there to reuse).
    main(["--checkpoint", str(tiny_export), "--out", str(tmp_path / "one"), "--split", "test", "--set",
          "eval.save_kb_cache=false"])
    export = shutil.copytree(tiny_export, tmp_path / "best", ignore=shutil.ignore_patterns("kb_cache-*"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
           "eval.evaluate", "--checkpoint", str(export), "--out", str(tmp_path / "two"), "--split", "test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = json.loads((tmp_path / "two" / "results-test.json").read_text())["kb_cache"]
    assert cache["state"] == "built" and Path(cache["path"]).is_file() and Path(cache["path"]).parent == export
    one, two = read_ranks(tmp_path / "one"), read_ranks(tmp_path / "two")
    assert [(r["index"], r["rank"], r["ties"], r["top_ids"]) for r in one] == [
        (r["index"], r["rank"], r["ties"], r["top_ids"]) for r in two]
    m1 = json.loads((tmp_path / "one" / "results-test.json").read_text())
    assert m1["kb_cache"]["path"] is None and m1["kb_cache"]["state"] == "built"
    m2 = json.loads((tmp_path / "two" / "results-test.json").read_text())
    assert m2["world_size"] == 2
    for k in ("H@1", "H@3", "H@5", "H@10", "H@20", "MRR", "MR"):
        assert m1["metrics"][k] == m2["metrics"][k]


def test_a_second_run_reuses_the_saved_cache_until_the_entity_side_changes(tiny_export, tmp_path, capsys):
    export = shutil.copytree(tiny_export, tmp_path / "best", ignore=shutil.ignore_patterns("kb_cache-*"))

    def run(name, *settings):
        args = ["--checkpoint", str(export), "--out", str(tmp_path / name), "--split", "dev", "--set", "eval.cache_dtype=int8"]
        main(args + [x for s in settings for x in ("--set", s)])
        return json.loads((tmp_path / name / "results-dev.json").read_text())["kb_cache"], read_ranks(tmp_path / name, "dev")

    first, ranks1 = run("first")
    assert first["state"] == "built" and first["dtype"] == "int8" and Path(first["path"]).is_file()
    second, ranks2 = run("second")
    assert second["state"] == "reused" and second["path"] == first["path"] and second["bytes"] == first["bytes"]
    assert ranks2 == ranks1  # ranks, ties, top ids and scores: the same cache, the same numbers
    assert "entity cache reused (int8, " in capsys.readouterr().out
    no_desc, _ = run("no_desc", "data.entity_desc=false")
    assert no_desc["state"] == "built" and no_desc["path"] != first["path"]
    assert len(list(export.glob("kb_cache-*.pt"))) == 2
    fp32, _ = run("fp32", "eval.cache_dtype=float32")
    assert fp32["state"] == "built" and fp32["bytes"] > 2.5 * first["bytes"]
