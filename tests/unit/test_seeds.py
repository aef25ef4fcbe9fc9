"""Several seeds: one run per seed and a mean +- standard deviation leaderboard."""

import json

import pytest

from launch.seeds import SeedsError, aggregate, parse_seeds, seed_config
from model.config import Config


def test_parse_seeds_and_seed_config():
    assert parse_seeds("43, 44,45") == [43, 44, 45]
    for bad in ("43,x", "", "1,1"):
        with pytest.raises(SeedsError, match="--seeds"):
            parse_seeds(bad)
    cfg = Config()
    cfg.train.run_name = "demo"
    one = seed_config(cfg, 44)
    assert (one.train.seed, one.data.seed, one.model.tiny_clip.seed, one.train.run_name) == (44, 44, 44, "demo-seed44")
    assert cfg.train.run_name == "demo" and cfg.train.seed == 0  # the original is untouched


def _results(path, h1, mrr, seen_h1):
    path.mkdir(parents=True)
    m = {"H@1": h1, "H@3": h1 + 10, "H@5": h1 + 20, "MRR": mrr, "MR": 2.0,
         "slice/gold_seen/H@1": seen_h1, "slice/gold_seen/MRR": seen_h1, "slice/gold_seen/mentions": 7}
    (path / "results-test.json").write_text(json.dumps({"dataset": "wikimel", "metrics": m}))


def test_aggregate_mean_and_sample_std(tmp_path):
    _results(tmp_path / "r-seed1", 70.0, 80.0, 90.0)
    _results(tmp_path / "r-seed2", 74.0, 84.0, 94.0)
    board = aggregate([tmp_path / "r-seed1", tmp_path / "r-seed2"], tmp_path / "r-seeds", "r (2 seeds)").read_text()
    # mean 72, sample std sqrt(((70-72)^2 + (74-72)^2) / 1) = 2.83
    assert "| **r (2 seeds)** | 72.00 ± 2.83 | 82.00 ± 2.83 | 92.00 ± 2.83 | 82.00 ± 2.83 | 2.00 ± 0.00 |" in board
    assert "| MMoE | 90.77" in board and "| r-seed2 | 74.00 |" in board
    assert "| gold seen in train | 7 | 92.00 ± 2.83 |" in board
    summary = json.loads((tmp_path / "r-seeds" / "results-seeds.json").read_text())
    assert summary["mean"]["H@1"] == 72.0 and summary["std"]["slice/gold_seen/H@1"] == pytest.approx(2.828, abs=1e-3)
    with pytest.raises(FileNotFoundError, match="test_at_end"):
        aggregate([tmp_path / "missing"], tmp_path / "x")
