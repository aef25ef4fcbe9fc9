"""The trainer as users run it: launch/train.py in its own processes (CPU, gloo, fp32)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import ROOT, free_port
from tests.support.runs import TINY, losses, train

COMMON = ["--set", "train.max_steps=12", "--set", "train.log_every=1", "--set", "train.eval_every_epochs=0",
          "--set", "train.test_at_end=false", "--set", "data.num_workers=2"]


def test_killed_run_resumes_exactly_and_never_from_a_half_written_checkpoint(tiny_shards, tmp_path):
    straight = train(COMMON + ["--set", "train.run_name=straight", "--set", "wandb.mode=offline"], tmp_path, tiny_shards)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = losses(tmp_path / "straight")
    assert sorted(reference) == list(range(1, 13))
    # W&B without an API key: offline run folder, printed at the end.
    assert "W&B offline run:" in straight.stdout
    assert list((tmp_path / "straight" / "wandb").glob("offline-run-*"))

    # Checkpoints every 3 steps; SIGKILL in the middle of writing the step-6 checkpoint.
    run = COMMON + ["--set", "train.run_name=killed", "--set", "train.save_every_steps=3", "--set", "wandb.mode=disabled"]
    killed = train(run, tmp_path, tiny_shards, env_extra={"MMOE_TEST_KILL_DURING_SAVE": "6"})
    assert killed.returncode == -9
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "step-0000003" / "complete.json").is_file()
    assert (ckpts / "step-0000006").is_dir() and not (ckpts / "step-0000006" / "complete.json").exists()

    resumed = train(run + ["--resume", "auto"], tmp_path, tiny_shards)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed incomplete checkpoint(s): step-0000006" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step-0000003" in resumed.stderr
    got = losses(tmp_path / "killed")  # steps 1..6 from the killed process, 4..12 from the resumed one
    for step in range(4, 13):
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"step {step}"
    # Kill again right after a complete checkpoint (step 9 of a longer run) and resume to the end.
    again = train(run + ["--set", "train.max_steps=15", "--resume", "auto"], tmp_path, tiny_shards,
                  env_extra={"MMOE_TEST_KILL_AT_STEP": "15"})
    assert again.returncode == -9
    assert (ckpts / "step-0000015" / "complete.json").is_file()
    assert not (ckpts / "step-0000003").exists()  # keep_checkpoints=2


def test_two_processes_with_the_deepspeed_launcher_train_save_and_resume(tiny_shards, tmp_path):
    port = free_port()
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]
    args = ["--set", "train.run_name=two", "--set", "train.max_steps=4", "--set", "train.save_every_steps=2",
            "--set", "train.eval_every_epochs=0", "--set", "train.test_at_end=true", "--set", "wandb.mode=disabled"]
    first = train(args, tmp_path, tiny_shards, launcher=launcher)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "[eval test] H@1" in first.stdout
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-0000004" / "complete.json").read_text())
    assert state["layout"]["world"] == 2 and state["trainer"]["step"] == 4
    assert (tmp_path / "two" / "checkpoints" / "step-0000004" / "rng-rank1.pt").is_file()
    assert (tmp_path / "two" / "leaderboard-test.md").is_file()
    # DeepSpeed's CPU shared-memory op (unused) would leave each rank's 66 MiB buffer in /dev/shm for good
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shared-memory buffers left"
    second = train(args[:-8] + ["--set", "train.max_steps=6", "--set", "train.eval_every_epochs=0",
                                "--set", "train.test_at_end=false", "--set", "wandb.mode=disabled", "--resume", "auto"],
                   tmp_path, tiny_shards, launcher=launcher)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resumed from" in second.stderr
    assert sorted(losses(tmp_path / "two"))[-1] == 6


def test_resuming_with_another_subset_or_zero_stage_is_refused(tiny_shards, tmp_path):
    """World size, batch size and workers may change on resume (tests/integration/test_resume_elsewhere.py, ZeRO included);
    the training subset and the ZeRO stage may not."""
    first = train(["--set", "train.run_name=w", "--set", "train.max_steps=2", "--set", "train.eval_every_epochs=0",
                   "--set", "train.test_at_end=false", "--set", "train.zero_stage=1",
                   "--set", "model.matcher.moe.backend=deepspeed"], tmp_path, tiny_shards)
    assert first.returncode == 0, first.stderr[-3000:]
    same = ["--set", "train.run_name=w", "--set", "train.max_steps=3", "--set", "model.matcher.moe.backend=deepspeed",
            "--resume", "auto"]
    stage = train(same + ["--set", "train.zero_stage=0"], tmp_path, tiny_shards)
    assert stage.returncode != 0 and "written with zero_stage=1, this run has 0" in stage.stderr
    subset = train(same + ["--set", "train.zero_stage=1", "--set", "data.train_fraction=0.5"], tmp_path, tiny_shards)
    assert subset.returncode != 0 and "train_fraction=1.0, this run has 0.5" in subset.stderr
    fresh = train(["--set", "train.run_name=w", "--set", "train.max_steps=3"], tmp_path, tiny_shards)
    assert fresh.returncode != 0 and "--resume auto" in fresh.stderr


def test_config_errors_name_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(TINY), "--set", "train.lrr=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "train.lrr" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(TINY), "--set", "train.epochs=many"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "train.epochs: expected int" in proc.stderr


def test_zero_stages_1_and_2_train_like_stage_0(tiny_shards, tmp_path):
    """ZeRO partitions optimizer state and gradients; in fp32 the losses must not change."""
    runs = {}
    for stage in (0, 1, 2):
        proc = train(["--set", f"train.run_name=z{stage}", "--set", f"train.zero_stage={stage}", "--set", "train.max_steps=4",
                      "--set", "train.log_every=1", "--set", "train.eval_every_epochs=0", "--set", "train.test_at_end=false"],
                     tmp_path, tiny_shards)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[stage] = losses(tmp_path / f"z{stage}")
    assert sorted(runs[0]) == [1, 2, 3, 4]
    for stage in (1, 2):
        for step, loss in runs[0].items():
            assert runs[stage][step] == pytest.approx(loss, rel=1e-5), f"ZeRO-{stage} step {step}"


def test_a_run_books_its_time_to_phases_and_the_test_reuses_the_last_dev_kb_cache(tiny_shards, tmp_path):
    """Every second of the run in one phase, the throughput against the matmul rate measured at the start, and
    the test evaluation of the model the last dev evaluation chose reusing that evaluation's KB cache, with the
    ranks eval.evaluate gives from the export."""
    import time

    from eval.evaluate import main as evaluate

    args = ["--set", "train.max_steps=6", "--set", "train.eval_every_epochs=0", "--set", "negatives.enabled=true",
            "--set", "negatives.warmup_epochs=0", "--set", "wandb.mode=disabled", "--set", "train.run_name=timed"]
    t0 = time.perf_counter()
    proc = train(args, tmp_path, tiny_shards)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "timed"
    row = [r for r in map(json.loads, open(run / "metrics.jsonl")) if "time/total_s" in r][-1]
    phases = ("setup", "train", "mining", "dev_eval", "test_eval", "checkpoint")
    assert all(row[f"time/{p}_s"] > 0 for p in phases), row
    assert sum(row[f"time/{p}_s"] for p in phases) == pytest.approx(row["time/total_s"])
    assert row["time/total_s"] < wall  # the process's own time, inside the command's
    assert row["throughput/matmul_gflops"] > 0 and row["throughput/flops_per_sample"] > 0
    assert 0 < row["throughput/matmul_fraction"] < 1.5
    assert "[time] setup" in proc.stdout + proc.stderr
    results = json.loads((run / "results-test.json").read_text())
    assert results["kb_cache"]["state"] == "reused in memory" and results["timings"]["encode_kb_s"] < 0.5
    evaluate(["--checkpoint", str(run / "best"), "--out", str(tmp_path / "again"), "--split", "test"])
    again = json.loads((tmp_path / "again" / "results-test.json").read_text())
    assert again["kb_cache"]["state"] != "reused in memory"
    mine = [json.loads(line) for line in open(run / "per_mention-test.jsonl")]
    other = [json.loads(line) for line in open(tmp_path / "again" / "per_mention-test.jsonl")]
    assert [(r["rank"], r["ties"], r["top_ids"]) for r in mine] == [(r["rank"], r["ties"], r["top_ids"]) for r in other]
