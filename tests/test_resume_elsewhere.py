"""Resuming on other hardware: a checkpoint written by 2 processes continues on 1 (grad_accum doubled, so
the global batch is the same), weights and optimizer state exactly as saved, the interrupted epoch over
exactly the samples not yet consumed (the sample-level check: tests/test_stream.py)."""

from __future__ import annotations

import json
import random
import statistics

import torch

from tests.test_preemption import BASE, deepspeed_launcher
from tests.test_trainer import losses, train
from train.checkpointing import load_weights_only
from train.preemption import PREEMPTED_EXIT_CODE


def epochs(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/epoch"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "train/epoch" in r}


def test_a_two_process_checkpoint_resumes_on_one_process_with_its_exact_state_and_the_rest_of_the_epoch(
        tiny_shards, tmp_path):
    args = BASE + ["--set", "train.max_steps=24"]
    reference = train(args + ["--set", "train.run_name=ref"], tmp_path, tiny_shards, launcher=deepspeed_launcher())
    assert reference.returncode == 0, reference.stderr[-3000:]
    at = random.Random().randint(2, 8)
    two = train(args + ["--set", "train.run_name=moved"], tmp_path, tiny_shards, launcher=deepspeed_launcher(),
                env_extra={"MMOE_TEST_SIGNAL_AT_STEP": str(at)})
    assert two.returncode == PREEMPTED_EXIT_CODE, two.stderr[-3000:]
    one = train(args + ["--set", "train.run_name=moved", "--set", "train.grad_accum=2", "--resume", "auto"], tmp_path,
                tiny_shards, env_extra={"MMOE_TEST_DUMP_LOADED": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed on another layout (world 2 -> 1): epoch 0 continues over the" in one.stderr

    # Right after loading: every weight and every Adam moment and step count as the 2-process run saved them.
    saved = load_weights_only(tmp_path / "moved" / "checkpoints" / f"step-{at + 1:07d}" / "mp_rank_00_model_states.pt")
    loaded = torch.load(tmp_path / "moved" / "loaded-rank0.pt", weights_only=True)
    assert saved["module"].keys() == loaded["module"].keys()
    assert all(torch.equal(saved["module"][k], loaded["module"][k]) for k in saved["module"])
    s, lo = saved["optimizer"]["state"], loaded["optimizer"]["state"]
    assert s.keys() == lo.keys() and all(torch.equal(s[i][n], lo[i][n]) for i in s for n in s[i])
    assert saved["lr_scheduler"]["last_epoch"] == at + 1

    # The interrupted epoch ends at the same optimizer step as the uninterrupted run's (same global batch, the
    # same samples left), and the loss stays in line with it.
    ref_epochs, got_epochs = epochs(tmp_path / "ref"), epochs(tmp_path / "moved")
    assert [s for s, e in got_epochs.items() if e == 1.0] == [s for s, e in ref_epochs.items() if e == 1.0] != []
    got, ref = losses(tmp_path / "moved"), losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, 25)) and all(got[k] == ref[k] for k in range(1, at + 2))
    after = range(at + 2, 25)
    mean_got, mean_ref = statistics.fmean(got[k] for k in after), statistics.fmean(ref[k] for k in after)
    assert abs(mean_got - mean_ref) < 0.25 * mean_ref, (mean_got, mean_ref)
