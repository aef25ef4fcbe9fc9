"""Several seeds: one run per seed and a mean +- standard deviation leaderboard."""

import json

from tests.support.runs import train


def test_train_with_seeds_writes_one_run_per_seed_and_the_aggregate(tiny_shards, tmp_path):
    args = ["--seeds", "3,4", "--set", "train.max_steps=4", "--set", "train.eval_every_epochs=0", "--set", "wandb.mode=disabled"]
    proc = train(args, tmp_path, tiny_shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [tmp_path / "tiny-seed3", tmp_path / "tiny-seed4"]
    results = [json.loads((r / "results-test.json").read_text())["metrics"] for r in runs]
    assert results[0]["MRR"] != results[1]["MRR"]  # the seeds differ
    board = (tmp_path / "tiny-seeds" / "leaderboard-test.md").read_text()
    assert "| **tiny (2 seeds)** |" in board and "| tiny-seed3 |" in board and "| tiny-seed4 |" in board
    assert "#### Slices (mean ± std)" in board and "=== seed 4: run tiny-seed4" in proc.stdout
    bad = train(["--seeds", "3,x"], tmp_path, tiny_shards)
    assert bad.returncode != 0 and "expected comma-separated integers" in bad.stderr
