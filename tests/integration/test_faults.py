"""Fault injection end to end on the tiny preset: what the trainer and the evaluator refuse, recover
from or count instead of producing a wrong number (docs/checks.md)."""

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

from tests.support.helpers import ROOT
from tests.support.runs import losses, train

QUICK = ["--set", "train.eval_every_epochs=0", "--set", "train.test_at_end=false", "--set", "wandb.mode=disabled"]


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl, parsed as strict JSON (no NaN/Infinity literals)."""
    def no_constants(name):
        raise ValueError(f"non-JSON constant {name} in metrics.jsonl")

    return [json.loads(line, parse_constant=no_constants) for line in open(run_dir / "metrics.jsonl")]


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
    """One injected NaN loss at step 3 with max_bad_steps=1: the update is skipped (weights and
    optimizer state after step 3 equal those after step 2), counted, and the run finishes."""
    from train.checkpointing import load_weights_only

    args = ["--set", "train.max_steps=5", "--set", "train.log_every=1", "--set", "train.save_every_steps=1",
            "--set", "train.keep_checkpoints=0"] + QUICK
    clean = train(args + ["--set", "train.run_name=clean"], tmp_path, tiny_shards)
    assert clean.returncode == 0, clean.stderr[-3000:]
    hit = train(args + ["--set", "train.run_name=hit", "--set", "train.max_bad_steps=1"], tmp_path, tiny_shards,
                env_extra={"MMOE_TEST_NAN_LOSS_AT_STEP": "3", "MMOE_TEST_DUMP_STATE": "1"})
    assert hit.returncode == 0, hit.stderr[-3000:]
    assert "step 3: non-finite loss or gradient norm (loss nan" in hit.stderr and "update skipped" in hit.stderr
    got, ref = losses(tmp_path / "hit"), losses(tmp_path / "clean")
    assert sorted(got) == [1, 2, 4, 5] and got[1] == ref[1] and got[2] == ref[2]
    assert all(math.isfinite(v) for v in got.values())
    assert [r["train/bad_steps"] for r in rows(tmp_path / "hit") if "train/loss" in r] == [0, 0, 1, 1]

    ckpts = tmp_path / "hit" / "checkpoints"

    def weights(step):
        return torch.load(ckpts / f"step-{step:07d}" / "state-rank0.pt", weights_only=True)

    def adam(step):
        return load_weights_only(ckpts / f"step-{step:07d}" / "mp_rank_00_model_states.pt")["optimizer"]["state"]

    w2, w3, w4 = weights(2), weights(3), weights(4)
    assert all(torch.equal(w2[k], w3[k]) for k in w2) and not all(torch.equal(w3[k], w4[k]) for k in w3)
    a2, a3 = adam(2), adam(3)
    assert a2.keys() == a3.keys() and all(torch.equal(a2[i][n], a3[i][n]) for i in a2 for n in a2[i])
    best = load_file(str(tmp_path / "hit" / "best" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in best.values())


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


CKPT = ["--set", "train.save_every_steps=2", "--set", "train.log_every=1", "--set", "train.lr=1e-3"] + QUICK


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_metrics_keep_one_row_per_step(tiny_shards, tmp_path):
    first = train(CKPT + ["--set", "train.run_name=r", "--set", "train.max_steps=4"], tmp_path, tiny_shards)
    assert first.returncode == 0, first.stderr[-3000:]  # train.lr=1e-3 (a YAML 1.1 string) is accepted as a float
    ckpts = tmp_path / "r" / "checkpoints"
    model_file = ckpts / "step-0000004" / "mp_rank_00_model_states.pt"
    with open(model_file, "r+b") as fh:  # truncated, complete.json intact
        fh.truncate(model_file.stat().st_size // 2)
    resumed = train(CKPT + ["--set", "train.run_name=r", "--set", "train.max_steps=6", "--resume", "auto"], tmp_path, tiny_shards)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"checkpoint {ckpts / 'step-0000004'} is damaged: mp_rank_00_model_states.pt has" in resumed.stderr
            and "falling back to the previous complete checkpoint" in resumed.stderr)
    assert f"resumed from {ckpts / 'step-0000002'} at step 2" in resumed.stderr
    steps = [r["step"] for r in rows(tmp_path / "r") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 of the first run were dropped, not duplicated

    # Every checkpoint damaged (one garbled in place, same size): a clear error, no traceback.
    for tag in ("step-0000004", "step-0000006"):
        path = ckpts / tag / "mp_rank_00_model_states.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    again = train(CKPT + ["--set", "train.run_name=r", "--set", "train.max_steps=8", "--resume", "auto"], tmp_path, tiny_shards)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert f"no loadable checkpoint in {ckpts}: step-0000006: mp_rank_00_model_states.pt does not have the sha256" in again.stderr


def test_resume_from_a_missing_folder_is_a_clear_error(tiny_shards, tmp_path):
    proc = train(QUICK + ["--set", "train.run_name=m", "--resume", str(tmp_path / "nowhere")], tmp_path, tiny_shards)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "AssertionError" not in proc.stderr
    assert f"--resume {tmp_path / 'nowhere'}: no such folder" in proc.stderr


def test_resuming_on_other_shards_is_refused_unless_allowed(tiny_shards, tmp_path):
    first = train(CKPT + ["--set", "train.run_name=d", "--set", "train.max_steps=2"], tmp_path, tiny_shards)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((tmp_path / "d" / "checkpoints" / "step-0000002" / "complete.json").read_text())
    assert len(state["manifest_sha256"]) == 64 and state["files"]["mp_rank_00_model_states.pt"]["bytes"] > 0
    other = tmp_path / "reconverted"
    shutil.copytree(tiny_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["note"] = "converted again"
    (other / "manifest.json").write_text(json.dumps(manifest))
    args = CKPT + ["--set", "train.run_name=d", "--set", "train.max_steps=3", "--resume", "auto"]
    refused = train(args, tmp_path, other)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "was trained on shards whose manifest.json has sha256" in refused.stderr and "--allow-data-change" in refused.stderr
    allowed = train(args + ["--allow-data-change"], tmp_path, other)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "warning: resuming on other shards" in allowed.stderr and "resumed from" in allowed.stderr


SAVE_TWICE = """
import sys, torch
from tests.support.helpers import tiny_model_config
from model.config import Config
from model.mmoe import MMoEModel
from model.export import save_export
torch.manual_seed(0)
model = MMoEModel(tiny_model_config())
save_export(model, Config(model=tiny_model_config()), sys.argv[1])
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
save_export(model, Config(model=tiny_model_config()), sys.argv[1])  # killed between its renames
"""


def test_a_kill_in_the_middle_of_the_best_model_swap_loses_nothing(tmp_path):
    from model.export import load_export, recover_export, save_export
    from model.mmoe import MMoEModel
    from tests.support.helpers import tiny_model_config

    best = tmp_path / "best"
    proc = subprocess.run([sys.executable, "-c", SAVE_TWICE, str(best)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MMOE_TEST_KILL_IN_EXPORT_SWAP="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not best.exists() and (tmp_path / "best.old" / "model.safetensors").is_file()
    torch.manual_seed(0)
    first = MMoEModel(tiny_model_config()).state_dict()
    model, _ = load_export(best)  # a reader at that instant gets the previous export
    assert all(torch.equal(model.state_dict()[k], first[k]) for k in first)
    recover_export(best)  # the trainer's start: the export its last checkpoint knows is best/ again
    assert (best / "model.safetensors").is_file() and not (tmp_path / "best.old").exists()
    assert all(torch.equal(load_export(best)[0].state_dict()[k], first[k]) for k in first)
    # A later save replaces it completely and leaves no sibling behind.
    save_export(model, load_export(best)[1], best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_an_offline_wandb_run_holds_dev_test_and_leaderboard_values(tiny_shards, tmp_path):
    from tests.support.wandb_records import history

    proc = train(["--set", "train.run_name=wb", "--set", "train.max_steps=4", "--set", "train.eval_every_steps=2",
                  "--set", "train.eval_every_epochs=0", "--set", "wandb.mode=offline"], tmp_path, tiny_shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (log,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = history(log)
    assert rows, "no history in the W&B run"
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    jsonl = [r for r in map(json.loads, open(tmp_path / "wb" / "metrics.jsonl"))]
    for prefix in ("train/loss", "dev/MRR", "dev/H@1", "test/MRR", "test/H@1"):
        ours = [(r["step"], r[prefix]) for r in jsonl if prefix in r]
        kept = [(r.get("trainer/step", r["_step"]), r[prefix]) for r in rows if prefix in r]
        assert ours and kept == ours, prefix
    assert [r["trainer/step"] for r in rows if "test/MRR" in r] == [4]
    board = [r for r in rows if "leaderboard/test/_type" in r]
    assert len(board) == 1 and board[0]["leaderboard/test/_type"] == "table-file" and board[0]["leaderboard/test/nrows"] >= 1
    internal = (tmp_path / "wb" / "wandb").glob("offline-run-*/logs/debug-internal.log")
    assert not any("less than the current step" in p.read_text() for p in internal)
