"""Hard negatives: exact neighbours, no gold, stream attachment, distributed mining, resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.support.helpers import ROOT, free_port
from tests.support.runs import losses, train
from train.negatives import load_table


def test_two_process_mining_equals_one_process(tiny_export, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "train.negatives", "--checkpoint", str(tiny_export), "--out",
                          str(tmp_path / "one.npy")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m",
                          "train.negatives", "--checkpoint", str(tiny_export), "--out", str(tmp_path / "two.npy")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert np.array_equal(load_table(tmp_path / "one.npy"), load_table(tmp_path / "two.npy"))
    assert json.loads((tmp_path / "one.json").read_text())["top_k"] == 10


NEG = ["--set", "train.max_steps=8", "--set", "train.log_every=1", "--set", "train.eval_every_epochs=0",
       "--set", "train.test_at_end=false", "--set", "negatives.enabled=true", "--set", "negatives.warmup_epochs=0",
       "--set", "negatives.top_k=8", "--set", "negatives.n_hard=2", "--set", "negatives.strategy=random",
       "--set", "wandb.mode=disabled"]


def test_resumed_run_attaches_the_same_negatives(tiny_shards, tmp_path):
    straight = train(NEG + ["--set", "train.run_name=straight"], tmp_path, tiny_shards)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "[negatives] mined" in straight.stdout + straight.stderr
    reference = losses(tmp_path / "straight")
    run = NEG + ["--set", "train.run_name=resumed", "--set", "train.save_every_steps=4"]
    killed = train(run, tmp_path, tiny_shards, env_extra={"MMOE_TEST_KILL_AT_STEP": "4"})
    assert killed.returncode == -9
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000004" / "complete.json").read_text())
    assert state["trainer"]["negatives_file"].endswith("epoch-000.npy")
    resumed = train(run + ["--resume", "auto"], tmp_path, tiny_shards)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[negatives] mined" not in resumed.stdout + resumed.stderr  # reused, not mined again
    got = losses(tmp_path / "resumed")
    for step in range(5, 9):
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"step {step}"
