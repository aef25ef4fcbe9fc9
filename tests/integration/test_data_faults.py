"""Fault injection on the data path (conversion, shards, images, records, the DME client, model and data
identity): every fault is either a clear error that names what is wrong or a counted, reported skip; none
gives a silently wrong result."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.data_faults import _cut_at_sample_boundary, _manifest


def test_first_ctrl_c_stops_the_dme_command_with_workers_stuck_in_slow_replies(hostile_llm, tiny_shards, tmp_path):
    import signal
    import subprocess
    import sys

    # The first request (the reachability probe) is answered; every later one trickles for a minute.
    server = hostile_llm(lambda n: "ok" if n == 1 else "trickle", trickle_s=0.5, trickle_bytes=120)
    raw = tiny_shards.parent / "raw"
    cmd = [sys.executable, "-m", "data_shards.dme", "--dataset", "synthetic", "--root", str(raw), "--backend", "llm",
           "--out", str(tmp_path / "dme"), "--no-cache", "--quiet", "--set", f"llm.base_url={server.base_url}",
           "llm.model=fake", "llm.timeout_s=120", "llm.concurrency=2", "batch=8"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while server.count < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert server.count >= 3, proc.communicate(timeout=5)
        time.sleep(0.3)  # both workers are inside their slow replies
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err
    assert elapsed < 5


def test_training_on_a_train_shard_cut_at_a_sample_boundary_stops_with_the_shard_named(shards_copy, tmp_path):
    from tests.support.runs import train

    entry = _manifest(shards_copy)["shards"]["train"][0]
    _cut_at_sample_boundary(shards_copy / entry["name"], keep=entry["samples"] - 5)
    args = ["--set", "train.max_steps=1000", "--set", "train.eval_every_epochs=0", "--set", "train.test_at_end=false",
            "--set", "data.num_workers=1", "--set", "wandb.mode=disabled", "--set", "train.run_name=cut"]
    proc = train(args, tmp_path / "runs", shards_copy, timeout=300)
    assert proc.returncode != 0
    assert f"{entry['name']} holds {entry['samples'] - 5} samples but the manifest lists {entry['samples']}" in proc.stderr
    assert "Traceback" not in proc.stderr.split("data error:")[-1]
