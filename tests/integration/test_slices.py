"""Evaluation slices: a hand-checked example, and the evaluation command end to end on the tiny benchmark."""

import json

import pytest

from eval.evaluate import main


def _raw(tiny_shards, split):
    return [r for r in json.loads((tiny_shards.parent / "raw" / f"SyntheticMEL_{split}.json").read_text())
            if r["answer"] != "nil"]


def test_evaluation_reports_slices_everywhere(tiny_export, tiny_shards, tmp_path, capsys):
    main(["--checkpoint", str(tiny_export), "--out", str(tmp_path), "--split", "test", "--name", "tiny"])
    m = json.loads((tmp_path / "results-test.json").read_text())["metrics"]
    train_answers = {r["answer"] for r in _raw(tiny_shards, "train")}
    test = _raw(tiny_shards, "test")
    assert m["slice/gold_seen/mentions"] == sum(r["answer"] in train_answers for r in test)
    assert m["slice/gold_seen/mentions"] + m["slice/gold_unseen/mentions"] == m["mentions"]
    assert m["slice/image/mentions"] == sum(bool(r["imgPath"]) for r in test)
    assert m["slice/desc_other/mentions"] == m["mentions"]  # the generator never copies the KB description
    assert m["slice/untied/mentions"] + m.get("slice/tied/mentions", 0) == m["mentions"]
    per = [json.loads(line) for line in open(tmp_path / "per_mention-test.jsonl")]
    seen = [r for r in per if r["gold_seen"]]
    assert len(seen) == m["slice/gold_seen/mentions"]
    assert 100.0 * sum(r["rank"] == 1 for r in seen) / len(seen) == pytest.approx(m["slice/gold_seen/H@1"])
    board = (tmp_path / "leaderboard-test.md").read_text()
    assert "| **tiny** |" in board and "#### Slices" in board and "| mention without an image |" in board
    assert "slices H@1/MRR: seen" in capsys.readouterr().out
