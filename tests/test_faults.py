"""Fault injection end to end on the tiny preset: what the trainer and the evaluator refuse, recover
from or count instead of producing a wrong number (README, "What the trainer checks")."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eval.metrics import NonFiniteScoreError, gold_ranks
from tests.test_trainer import ROOT, losses, train

QUICK = ["--set", "train.eval_every_epochs=0", "--set", "train.test_at_end=false", "--set", "wandb.mode=disabled"]


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl, parsed as strict JSON (no NaN/Infinity literals)."""
    def no_constants(name):
        raise ValueError(f"non-JSON constant {name} in metrics.jsonl")

    return [json.loads(line, parse_constant=no_constants) for line in open(run_dir / "metrics.jsonl")]


# -- 1. non-finite losses, gradients and scores ---------------------------------------------------------------

def test_a_diverging_run_stops_naming_the_step_and_exports_nothing(tiny_shards, tmp_path):
    proc = train(["--set", "train.run_name=nan", "--set", "train.lr=1.0e+10", "--set", "train.eval_every_epochs=1"],
                 tmp_path, tiny_shards)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "training diverged at step 2: non-finite loss or gradient norm" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "nan" / "best").exists() and not (tmp_path / "nan" / "checkpoints").exists()
    assert "[eval" not in proc.stdout  # no dev/test numbers from NaN weights
    assert rows(tmp_path / "nan")[-1] == {"step": 2, "train/bad_steps": 1}


def test_max_bad_steps_skips_and_counts_then_stops(tiny_shards, tmp_path):
    proc = train(["--set", "train.run_name=skip", "--set", "train.lr=1.0e+10", "--set", "train.max_bad_steps=2"] + QUICK,
                 tmp_path, tiny_shards)
    assert proc.returncode == 1
    assert "step 2: non-finite loss or gradient norm (loss nan" in proc.stderr
    assert "update skipped (bad step 2 of train.max_bad_steps=2)" in proc.stderr
    assert "training diverged at step 4" in proc.stderr and "bad steps 3" in proc.stderr


def test_a_skipped_bad_step_leaves_the_weights_alone_and_training_goes_on(tiny_shards, tmp_path):
    """One injected NaN loss at step 3 with max_bad_steps=1: the update is skipped, counted, the run
    finishes; every other step's loss equals a clean run's until step 3 (after it, the weights
    differ by the one skipped update)."""
    args = ["--set", "train.max_steps=5", "--set", "train.log_every=1"] + QUICK
    clean = train(args + ["--set", "train.run_name=clean"], tmp_path, tiny_shards)
    assert clean.returncode == 0, clean.stderr[-3000:]
    hit = train(args + ["--set", "train.run_name=hit", "--set", "train.max_bad_steps=1"], tmp_path, tiny_shards,
                env_extra={"MMOE_TEST_NAN_LOSS_AT_STEP": "3"})
    assert hit.returncode == 0, hit.stderr[-3000:]
    assert "step 3: non-finite loss or gradient norm (loss nan" in hit.stderr and "update skipped" in hit.stderr
    got, ref = losses(tmp_path / "hit"), losses(tmp_path / "clean")
    assert sorted(got) == [1, 2, 4, 5] and got[1] == ref[1] and got[2] == ref[2]
    # Step 4 starts from the weights after step 2, as the clean step 3 did (its batch is the next one).
    assert all(math.isfinite(v) for v in got.values())
    assert [r["train/bad_steps"] for r in rows(tmp_path / "hit") if "train/loss" in r] == [0, 0, 1, 1]
    weights = load_file(str(tmp_path / "hit" / "best" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_gold_ranks_refuses_nan_anywhere_in_a_row():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, float("nan"), 0.1], [float("nan"), 0.3, 0.2], [0.1, 0.2, float("inf")]])
    with pytest.raises(NonFiniteScoreError) as err:
        gold_ranks(scores, torch.tensor([0, 0, 0, 1]))
    assert err.value.rows == [1, 2, 3]
    rank, ties = gold_ranks(scores[:1], torch.tensor([0]))  # finite rows: unchanged behaviour
    assert rank.tolist() == [1] and ties.tolist() == [0]


def _nan_export(tiny_export: Path, out: Path) -> Path:
    shutil.copytree(tiny_export, out)
    state = load_file(str(out / "model.safetensors"))
    for k in state:
        if k.startswith("matcher."):
            state[k] = torch.full_like(state[k], float("nan")) if state[k].is_floating_point() else state[k]
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("mode", ["exact", "two-stage"])
def test_evaluating_nan_weights_is_an_error_naming_split_and_mention(tiny_export, tmp_path, mode):
    ckpt = _nan_export(tiny_export, tmp_path / "nan")
    proc = subprocess.run([sys.executable, "-m", "eval.evaluate", "--checkpoint", str(ckpt), "--split", "dev", "--mode", mode],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1
    assert "evaluation of split 'dev': the model gives a NaN or infinite score for 59 mention(s)" in proc.stderr
    assert "index 0 (id synth-dev-" in proc.stderr and "Traceback" not in proc.stderr
    assert not (ckpt / "results-dev.json").exists() and not (ckpt / "per_mention-dev.jsonl").exists()
