"""Preemption and failed ranks, end to end on the tiny preset (CPU, gloo): a stop signal becomes a complete
checkpoint at the next optimizer step and exit code 75, the resumed run is the uninterrupted one, a dead or
hung rank ends the job within train.collective_timeout_s with one line naming it (train/preemption.py,
launch/train.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.runs import BASE, deepspeed_launcher, losses, start, train, wait_for_rows
from train.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_FILE


def run_processes(run_name: str) -> list[int]:
    """PIDs of any process still running with this run's name on its command line."""
    out = subprocess.run(["pgrep", "-f", f"train.run_name={run_name}( |$)"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / PREEMPTED_FILE).read_text())


def test_a_signal_at_a_random_step_checkpoints_the_next_step_and_the_resumed_run_is_the_uninterrupted_one(
        tiny_shards, tmp_path):
    args = BASE + ["--set", "train.max_steps=10", "--set", "data.num_workers=2"]
    straight = train(args + ["--set", "train.run_name=straight"], tmp_path, tiny_shards)
    assert straight.returncode == 0, straight.stderr[-3000:]
    at = random.Random().randint(1, 8)  # the step after which the scheduler's signal arrives
    hit = train(args + ["--set", "train.run_name=hit"], tmp_path, tiny_shards, env_extra={"MMOE_TEST_SIGNAL_AT_STEP": str(at)})
    assert hit.returncode == PREEMPTED_EXIT_CODE, (at, hit.stderr[-3000:])
    # The signal came after step `at`: the ranks agree at the next step's boundary and stop after it.
    rec = record(tmp_path / "hit")
    assert rec["step"] == at + 1 and rec["signal"] == "SIGUSR1" and rec["exit_code"] == PREEMPTED_EXIT_CODE, at
    folder = Path(rec["checkpoint"])
    assert folder.name == f"step-{at + 1:07d}" and (folder / "complete.json").is_file()
    assert f"preempted (SIGUSR1) at step {at + 1}" in hit.stderr and "Traceback" not in hit.stderr
    assert "[preemption] SIGTERM/SIGUSR1: every rank stops at the next optimizer step" in hit.stdout
    assert max(losses(tmp_path / "hit")) == at + 1  # every step trained was checkpointed: none lost

    resumed = train(args + ["--set", "train.run_name=hit", "--resume", "auto"], tmp_path, tiny_shards)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {folder} at step {at + 1}" in resumed.stderr
    assert losses(tmp_path / "hit") == losses(tmp_path / "straight"), at  # bit-identical rows, one per step
    assert not (tmp_path / "hit" / PREEMPTED_FILE).exists()  # the record describes the attempt that was stopped


def dev_rows(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["dev/MRR"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "dev/MRR" in r}


def test_a_stop_before_a_due_dev_evaluation_defers_it_to_the_resumed_run(tiny_shards, tmp_path):
    """The stop is agreed at step 4, where a dev evaluation is due: the checkpoint comes first (the grace has no
    room for an evaluation), and the resumed run evaluates before it trains on: the same dev and loss rows."""
    args = BASE + ["--set", "train.max_steps=6", "--set", "train.eval_every_steps=4"]
    straight = train(args + ["--set", "train.run_name=straight"], tmp_path, tiny_shards)
    assert straight.returncode == 0, straight.stderr[-3000:]
    hit = train(args + ["--set", "train.run_name=hit"], tmp_path, tiny_shards, env_extra={"MMOE_TEST_SIGNAL_AT_STEP": "3"})
    assert hit.returncode == PREEMPTED_EXIT_CODE, hit.stderr[-3000:]
    assert record(tmp_path / "hit")["step"] == 4 and dev_rows(tmp_path / "hit") == {}
    resumed = train(args + ["--set", "train.run_name=hit", "--resume", "auto"], tmp_path, tiny_shards)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = dev_rows(tmp_path / "straight")
    assert 4 in want and dev_rows(tmp_path / "hit") == want
    assert losses(tmp_path / "hit") == losses(tmp_path / "straight")


@pytest.mark.parametrize("where", ["dev", "mining"])
def test_a_stop_during_a_dev_evaluation_or_mining_checkpoints_at_once_and_the_resume_does_it_again(
        tiny_shards, tmp_path, where):
    """A stop signal to rank 0 only, in the middle of encoding the KB (eval.batch_size 4: the check runs every
    16 batches): both ranks agree on it there instead of at the end of a long evaluation (a scheduler's grace
    is short), checkpoint and exit 75; the resumed run evaluates (or mines) again and goes on as the
    uninterrupted run did: the same dev and loss rows."""
    args = BASE + ["--set", "train.max_steps=6", "--set", "eval.batch_size=4"]
    args += (["--set", "train.eval_every_steps=4"] if where == "dev" else
             ["--set", "negatives.enabled=true", "--set", "negatives.warmup_epochs=0", "--set", "negatives.refresh_epochs=0",
              "--set", "negatives.top_k=4"])
    at = 4 if where == "dev" else 0
    straight = train(args + ["--set", "train.run_name=straight"], tmp_path, tiny_shards, launcher=deepspeed_launcher())
    assert straight.returncode == 0, straight.stderr[-3000:]
    hit = train(args + ["--set", "train.run_name=hit"], tmp_path, tiny_shards, launcher=deepspeed_launcher(),
                env_extra={"MMOE_TEST_SIGNAL_IN_EVAL": str(at)})
    assert hit.returncode == PREEMPTED_EXIT_CODE, hit.stderr[-3000:]
    said = "during the dev evaluation (encode KB)" if where == "dev" else "during mining (mining: encode KB)"
    assert f"[preemption] SIGUSR1 {said}" in hit.stderr, hit.stderr[-3000:]
    assert record(tmp_path / "hit")["step"] == at and dev_rows(tmp_path / "hit") == {}
    assert not (tmp_path / "hit" / "negatives").exists() or not list((tmp_path / "hit" / "negatives").glob("*.npy"))
    resumed = train(args + ["--set", "train.run_name=hit", "--resume", "auto"], tmp_path, tiny_shards,
                    launcher=deepspeed_launcher())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert dev_rows(tmp_path / "hit") == dev_rows(tmp_path / "straight") and (where != "dev" or 4 in dev_rows(tmp_path / "hit"))
    assert losses(tmp_path / "hit") == losses(tmp_path / "straight")


def test_a_save_at_the_step_resumed_from_keeps_that_checkpoint_until_the_new_one_is_complete(tiny_shards, tmp_path):
    """A finished run resumed again saves its last step once more; killed in the middle of that save, the
    checkpoint it resumed from is still there, undamaged, and the next resume uses it."""
    args = BASE + ["--set", "train.max_steps=3", "--set", "train.run_name=again"]
    first = train(args, tmp_path, tiny_shards)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "again" / "checkpoints" / "step-0000003"
    killed = train(args + ["--resume", "auto"], tmp_path, tiny_shards, env_extra={"MMOE_TEST_KILL_DURING_SAVE": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (folder / "complete.json").is_file()
    last = train(args + ["--resume", "auto"], tmp_path, tiny_shards)
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"resumed from {folder} at step 3" in last.stderr and "damaged" not in last.stderr
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == ["step-0000003"]


def test_sigterm_to_a_whole_two_process_job_stops_every_rank_after_one_complete_checkpoint(tiny_shards, tmp_path):
    """What a scheduler does: SIGTERM to every process of the job (deepspeed runner, per-node launcher,
    both ranks, their DataLoader workers) at a random point; the launcher's SIGKILL would follow 30 s later."""
    args = BASE + ["--set", "train.max_steps=12", "--set", "data.num_workers=2"]
    straight = start(args + ["--set", "train.run_name=straight"], tmp_path, tiny_shards, tmp_path / "straight.log")
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    after = random.Random().randint(2, 7)
    job = start(args + ["--set", "train.run_name=sigterm-job"], tmp_path, tiny_shards, tmp_path / "job.log")
    wait_for_rows(tmp_path / "sigterm-job", after, job)
    signalled = time.monotonic()
    os.killpg(job.pid, signal.SIGTERM)
    job.wait(timeout=60)
    deadline = time.monotonic() + 60
    while run_processes("sigterm-job") and time.monotonic() < deadline:
        time.sleep(0.1)
    gone_s = time.monotonic() - signalled
    log = (tmp_path / "job.log").read_text()
    assert not run_processes("sigterm-job"), log[-3000:]
    assert gone_s < 25, f"{gone_s:.1f}s from SIGTERM until the last rank exited (the launcher's SIGKILL comes at 30 s)"
    rec = record(tmp_path / "sigterm-job")
    assert rec["signal"] == "SIGTERM" and rec["step"] >= after, (after, rec)
    assert "DataLoader worker" not in log and "Traceback" not in log, log[-3000:]
    assert max(losses(tmp_path / "sigterm-job")) == rec["step"]  # no step trained past the checkpoint: none lost

    resumed = start(args + ["--set", "train.run_name=sigterm-job", "--resume", "auto"], tmp_path, tiny_shards,
                    tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert losses(tmp_path / "sigterm-job") == losses(tmp_path / "straight")


def test_sigterm_to_the_deepspeed_command_alone_stops_the_ranks_instead_of_orphaning_them(tiny_shards, tmp_path):
    job = start(BASE + ["--set", "train.max_steps=200", "--set", "train.run_name=orphan-job"], tmp_path, tiny_shards,
                tmp_path / "orphan.log")
    wait_for_rows(tmp_path / "orphan-job", 2, job)
    job.send_signal(signal.SIGTERM)  # the runner only: it dies at once, its per-node launcher and the ranks do not
    job.wait(timeout=30)
    deadline = time.monotonic() + 60
    while run_processes("orphan-job") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not run_processes("orphan-job"), (tmp_path / "orphan.log").read_text()[-3000:]
    rec = record(tmp_path / "orphan-job")
    assert rec["signal"] == "a launcher process died" and rec["step"] < 200
    assert max(losses(tmp_path / "orphan-job")) == rec["step"]


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_rank_ends_the_job_within_the_timeout_with_one_line_naming_it(tiny_shards, tmp_path, fault):
    timeout_s = 10
    args = BASE + ["--set", "train.max_steps=8", "--set", "train.save_every_steps=2",
                   "--set", f"train.collective_timeout_s={timeout_s}", "--set", f"train.run_name=dead-{fault}"]
    job = start(args, tmp_path, tiny_shards, tmp_path / f"{fault}.log", env_extra={"MMOE_TEST_RANK_FAULT": f"{fault}:1:3"})
    wait_for_rows(tmp_path / f"dead-{fault}", 2, job)
    began = time.monotonic()
    rc = job.wait(timeout=240)
    ended_s = time.monotonic() - began
    log = (tmp_path / f"{fault}.log").read_text()
    assert rc != 0 and not run_processes(f"dead-{fault}"), log[-3000:]
    # Survivor: timeout (hang only) + up to 15 s waiting for the others to check in; a hung rank ignores the
    # launcher's SIGTERM and is killed 30 s later.
    assert ended_s < timeout_s + 15 + 30 + 15, f"{ended_s:.0f}s"
    lines = [line for line in log.splitlines() if line.startswith("error: rank 0 of 2: a collective failed")]
    assert len(lines) == 1, log[-3000:]
    assert "rank(s) 1 did not answer" in lines[0] and "checkpoints/step-0000002" in lines[0], lines[0]
    if fault == "hang":
        assert f"Timed out waiting {timeout_s * 1000}ms" in lines[0]
    assert "Traceback" not in log

    if fault == "kill":  # both faults leave the same state (step 2 complete, step 3 never saved): resumed once
        resumed = train(args + ["--resume", "auto"], tmp_path, tiny_shards, launcher=deepspeed_launcher())
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "step-0000002 at step 2" in resumed.stderr and sorted(losses(tmp_path / f"dead-{fault}")) == list(range(1, 9))
