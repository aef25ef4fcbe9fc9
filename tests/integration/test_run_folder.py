"""Run folders never lose a user's data: one run at a time (the lock), a fresh run destroys nothing it did not
make, a resume keeps the settings that decide the data plan and the model, the dev and KB shards are checked
before training (train/run_folder.py, train/checkpoint_manager.py, train/trainer.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import ROOT
from tests.support.runs import BASE, losses, start, train, wait_for_rows
from train.run_folder import LOCK, RunFolderError, RunFolderLock


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoint, best/, results-test.json); read-only: copy it before changing it."""
    out = tmp_path_factory.mktemp("finished")
    args = BASE + ["--set", "train.max_steps=2", "--set", "train.test_at_end=true", "--set", "train.run_name=done"]
    proc = train(args, out, tiny_shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "done"


def export_command(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.checkpointing", "export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def hold_lock(run_dir: Path, then: str) -> subprocess.Popen:
    """Another process that takes the lock, then sleeps (``sleep``) or dies without releasing it (``die``)."""
    code = (f"import os, sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from train.run_folder import RunFolderLock; RunFolderLock(Path({str(run_dir)!r})).acquire(); "
            "print('held', flush=True); " + ("time.sleep(120)" if then == "sleep" else "os._exit(0)"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_a_dead_one_is_taken_over_another_host_needs_break_lock(tmp_path):
    run = tmp_path / "r"
    live = hold_lock(run, "sleep")
    try:
        with pytest.raises(RunFolderError, match=f"in use by another run \\(PID {live.pid} on {socket.gethostname()}"):
            RunFolderLock(run).acquire()
    finally:
        live.kill()
        live.wait()
    # The killed holder left its lock behind: a dead process on this host, taken over.
    lock = RunFolderLock(run)
    assert f"from a dead process: PID {live.pid}" in lock.acquire()
    assert json.loads((run / LOCK).read_text())["pid"] != live.pid
    lock.release()
    assert not (run / LOCK).exists()

    (run / LOCK).write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "yesterday"}))
    with pytest.raises(RunFolderError, match="on another host \\(PID 4242 on node-17.*--break-lock"):
        RunFolderLock(run).acquire()
    assert "a run on another host (--break-lock): PID 4242 on node-17" in RunFolderLock(run).acquire(break_lock=True)


def test_a_second_trainer_on_a_running_runs_folder_stops_at_once_naming_the_holder(tiny_shards, tmp_path):
    first = start(BASE + ["--set", "train.max_steps=3000", "--set", "train.epochs=1000", "--set", "train.run_name=shared"],
                  tmp_path, tiny_shards, tmp_path / "first.log")
    try:
        wait_for_rows(tmp_path / "shared", 1, first)
        rows = len(losses(tmp_path / "shared"))
        started = time.monotonic()
        second = train(BASE + ["--set", "train.max_steps=3", "--set", "train.run_name=shared", "--set", "train.seed=9",
                               "--resume", "auto"], tmp_path, tiny_shards)
        assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"{tmp_path / 'shared'} is in use by another run (PID" in second.stderr
        assert time.monotonic() - started < 60 and first.poll() is None  # refused while the first one trains
        config = (tmp_path / "shared" / "config.yaml").read_text()
        assert "seed: 9" not in config and len(losses(tmp_path / "shared")) >= rows  # nothing of the first run touched
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the job's whole session: launcher and ranks
        first.wait()


def victim_folder(out: Path) -> Path:
    run = out / "victim"
    (run / "checkpoints" / "my-model").mkdir(parents=True)
    (run / "checkpoints" / "my-model" / "weights.bin").write_bytes(b"precious")
    (run / "best").mkdir()
    (run / "best" / "notes.txt").write_text("notes")
    (run / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    return run


def test_a_fresh_run_refuses_a_folder_with_contents_and_overwrite_moves_them_aside(tiny_shards, tmp_path):
    run = victim_folder(tmp_path)
    args = BASE + ["--set", "train.max_steps=2", "--set", "train.run_name=victim"]
    for resume in ("none", "auto"):  # auto: no checkpoint there, so it would start afresh too
        proc = train(args + ["--resume", resume], tmp_path, tiny_shards)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"{run} is not empty (best/, checkpoints/, metrics.jsonl)" in proc.stderr and "--overwrite" in proc.stderr
        assert (run / "checkpoints" / "my-model" / "weights.bin").read_bytes() == b"precious"
        assert (run / "best" / "notes.txt").is_file() and "mine" in (run / "metrics.jsonl").read_text()
    moved = train(args + ["--overwrite"], tmp_path, tiny_shards)
    assert moved.returncode == 0, moved.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("victim.replaced-")]
    assert len(aside) == 1 and f"moved the earlier contents of {run} to {aside[0]}" in moved.stderr
    assert (aside[0] / "checkpoints" / "my-model" / "weights.bin").read_bytes() == b"precious"
    assert (aside[0] / "best" / "notes.txt").read_text() == "notes"
    assert sorted(losses(run)) == [1, 2] and not (run / LOCK).exists()  # the lock goes with the run


def test_a_resume_leaves_folders_it_did_not_write_in_the_checkpoints_folder_alone(tiny_shards, tmp_path):
    args = BASE + ["--set", "train.max_steps=2", "--set", "train.run_name=mine"]
    assert train(args, tmp_path, tiny_shards).returncode == 0
    theirs = tmp_path / "mine" / "checkpoints" / "my-model"
    theirs.mkdir()
    (theirs / "weights.bin").write_bytes(b"precious")
    again = train(args + ["--resume", "auto"], tmp_path, tiny_shards)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "left alone in" in again.stderr and (theirs / "weights.bin").read_bytes() == b"precious"


def test_a_resume_with_another_data_seed_or_model_shape_is_refused_naming_each_key(tiny_shards, tmp_path):
    args = BASE + ["--set", "train.max_steps=2", "--set", "train.run_name=kept"]
    assert train(args, tmp_path, tiny_shards).returncode == 0
    changed = ["--set", "train.max_steps=3", "--set", "data.seed=5", "--set", "model.matcher.moe.top_k=1",
               "--resume", "auto"]
    refused = train(args + changed, tmp_path, tiny_shards)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "data.seed 0 -> 5" in refused.stderr and "model.matcher.moe.top_k 2 -> 1" in refused.stderr
    assert "seed: 5" not in (tmp_path / "kept" / "config.yaml").read_text()
    # What the elastic resume re-plans may change (tests/integration/test_resume_elsewhere.py): here the shuffle buffer.
    replanned = train(args + ["--set", "train.max_steps=3", "--set", "data.shuffle_buffer=4", "--resume", "auto"],
                      tmp_path, tiny_shards)
    assert replanned.returncode == 0, replanned.stderr[-3000:]
    forced = train(args + ["--set", "train.max_steps=4", "--set", "data.seed=5", "--resume", "auto",
                           "--allow-config-change"], tmp_path, tiny_shards)
    assert forced.returncode == 0 and "resuming with changed settings (--allow-config-change): data.seed 0 -> 5" in forced.stderr


def test_a_tampered_dev_shard_is_refused_before_training(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    dev = sorted((shards / "dev").glob("*.tar"))[0]
    data = bytearray(dev.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    dev.write_bytes(bytes(data))
    proc = train(BASE + ["--set", "train.max_steps=2", "--set", "train.run_name=t"], tmp_path, shards)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert dev.name in proc.stderr and "eval.verify_checksums=false" in proc.stderr
    assert not (tmp_path / "t" / "metrics.jsonl").exists()


def test_a_disk_that_fills_during_a_checkpoint_save_keeps_the_last_complete_one(tiny_shards, tmp_path, small_disk):
    """A tmpfs with room for about one tiny checkpoint (1.5 MiB) and the run's small files: a later save fills it.
    One line says so; the complete checkpoints stay undamaged and a resume elsewhere continues from the last."""
    from train.checkpointing import damage

    disk = small_disk(2200)
    args = BASE + ["--set", "train.max_steps=8", "--set", "train.save_every_steps=2", "--set", "train.run_name=full"]
    proc = train(args, disk, tiny_shards)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    want = f"error: the disk is full (no space left on device writing {disk / 'full' / 'checkpoints'}/step-"
    assert line.startswith(want), line
    failed = int(line.split("/step-")[1][:7])
    checkpoints = disk / "full" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())  # the partial one was removed
    assert kept and kept[-1] == f"step-{failed - 2:07d}" and all(damage(checkpoints / k) is None for k in kept)
    shutil.copytree(disk / "full", tmp_path / "roomy" / "full")
    again = train(args + ["--resume", "auto"], tmp_path / "roomy", tiny_shards)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path / 'roomy' / 'full' / 'checkpoints' / kept[-1]} at step {failed - 2}" in again.stderr
    assert sorted(losses(tmp_path / "roomy" / "full")) == list(range(1, 9))


def test_exporting_with_the_config_of_another_model_size_says_so_in_one_line(tiny_shards, tmp_path):
    args = BASE + ["--set", "train.max_steps=2", "--set", "train.run_name=sized"]
    assert train(args, tmp_path, tiny_shards).returncode == 0
    run = tmp_path / "sized"
    other = tmp_path / "other.yaml"
    other.write_text((run / "config.yaml").read_text().replace("hidden: 16", "hidden: 20", 1))
    assert other.read_text() != (run / "config.yaml").read_text()
    checkpoint = next((run / "checkpoints").glob("step-*"))
    proc = subprocess.run([sys.executable, "-m", "train.checkpointing", "export", str(checkpoint), str(tmp_path / "out"),
                           "--config", str(other)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"the weights of {checkpoint} do not fit {other} (" in proc.stderr and "--config" in proc.stderr


def test_a_disk_that_fills_during_the_best_export_says_so_in_one_line_and_leaves_no_partial_export(
        tiny_shards, small_disk):
    disk = small_disk(300)  # the run's small files fit, the tiny export (about 390 KiB) does not
    args = BASE + ["--set", "train.max_steps=2", "--set", "train.eval_every_steps=2", "--set", "train.run_name=fb"]
    proc = train(args, disk, tiny_shards)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: the disk is full (no space left on device writing {disk / 'fb' / 'best'}): free space; no complete "
        "checkpoint was written yet: start the run again, with --overwrite to move what it wrote aside")
    assert not (disk / "fb" / "best.tmp").exists() and not (disk / "fb" / "best").exists()


def test_a_checkpoint_export_that_fills_the_disk_says_so_and_leaves_nothing(finished_run, small_disk):
    disk = small_disk(100)
    checkpoint = next((finished_run / "checkpoints").glob("step-*"))
    proc = export_command(checkpoint, disk / "exp")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: the disk is full (no space left on device writing {disk / 'exp'}): free "
                                   "space, or export elsewhere")
    assert list(disk.iterdir()) == []


def test_a_checkpoint_export_refuses_a_folder_that_is_not_an_export(finished_run, tmp_path):
    checkpoint = next((finished_run / "checkpoints").glob("step-*"))
    data = tmp_path / "dataset"
    (data / "images").mkdir(parents=True)
    (data / "kb_entity.json").write_text("{}")
    proc = export_command(checkpoint, data)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: {data} is not empty and is not a model export (images/, kb_entity.json): "
                                   "exporting would replace it; choose a new or empty folder for the export (nothing "
                                   "was written)")
    assert sorted(p.name for p in data.iterdir()) == ["images", "kb_entity.json"]
    for _ in range(2):  # a new folder, then the export written there: replaced
        assert export_command(checkpoint, tmp_path / "exp").returncode == 0


def test_resume_auto_without_checkpoints_does_not_restart_over_a_trained_run(finished_run, tiny_shards, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoints")  # deleted to save space; best/ and the results stay
    before = {name: (run / name).read_bytes() for name in ("best/model.safetensors", "metrics.jsonl", "results-test.json")}
    proc = train(BASE + ["--set", "train.max_steps=2", "--set", "train.run_name=done", "--resume", "auto"], tmp_path,
                 tiny_shards)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {run} holds a trained run (best/, leaderboard-test.md, per_mention-test.jsonl, results-test.json) but "
        "no complete checkpoint to continue: a fresh run would overwrite it. Choose another train.run_name, or pass "
        "--overwrite to move its contents aside to done.replaced-<time>/")
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_run_refused_before_training_leaves_nothing_that_refuses_the_same_fresh_run(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    dev = sorted((shards / "dev").glob("*.tar"))[0]
    data = bytearray(dev.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dev.write_bytes(bytes(data))
    args = BASE + ["--set", "train.max_steps=2", "--set", "train.run_name=again"]
    assert train(args, tmp_path, shards).returncode != 0  # refused by the shard check, before any step
    assert (tmp_path / "again" / "run.json").is_file()
    proc = train(args, tmp_path, tiny_shards)  # the same fresh command, once the shards are good
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(tmp_path / "again")) == [1, 2]


def test_exporting_with_another_model_setting_than_the_trained_one_names_the_key(finished_run, tmp_path):
    checkpoint = next((finished_run / "checkpoints").glob("step-*"))
    other = tmp_path / "other.yaml"
    other.write_text((finished_run / "config.yaml").read_text().replace("top_k: 2", "top_k: 1", 1))
    assert other.read_text() != (finished_run / "config.yaml").read_text()
    proc = export_command(checkpoint, tmp_path / "out", "--config", other)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: {other} has other model settings than {checkpoint} was trained with "
                                   "(model.matcher.moe.top_k 2 -> 1): the export would carry a model that was not "
                                   "trained; pass the run's own config.yaml with --config")
    assert not (tmp_path / "out").exists()


def test_a_disk_full_at_the_first_checkpoint_says_none_was_written(tiny_shards, small_disk):
    disk = small_disk(1000)  # the first checkpoint (about 1.3 MiB) does not fit
    args = BASE + ["--set", "train.max_steps=2", "--set", "train.save_every_steps=2", "--set", "train.run_name=nock"]
    proc = train(args, disk, tiny_shards)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: the disk is full (no space left on device writing {disk / 'nock' / 'checkpoints' / 'step-0000002'}): "
        "free space; no complete checkpoint was written yet: start the run again, with --overwrite to move what it "
        "wrote aside")
