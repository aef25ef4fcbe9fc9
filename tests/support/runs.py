"""The trainer run as users run it, for the integration tests: ``launch/train.py`` on the tiny config in its own
process (``train``), or as a 2-process ``deepspeed`` job in its own session (``start``), and the loss rows a
run wrote (``losses``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.helpers import ROOT, free_port, run_bounded

TINY = ROOT / "launch" / "configs" / "tiny.yaml"
# Every step logged, no epoch-end evaluation, no test at the end, no W&B: the settings most runs share.
BASE = ["--set", "train.log_every=1", "--set", "train.eval_every_epochs=0", "--set", "train.test_at_end=false",
        "--set", "wandb.mode=disabled"]


def train(args, out_dir, shards, env_extra=None, launcher=None, timeout=600) -> subprocess.CompletedProcess:
    """``launch/train.py --config tiny.yaml`` on ``shards`` into ``out_dir`` with ``args``; one process unless
    ``launcher`` (e.g. ``deepspeed_launcher()``) is given; bounded by ``timeout`` (helpers.run_bounded)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_API_KEY", None)
    env.update(env_extra or {})
    base = ["launch/train.py", "--config", str(TINY), "--set", f"data.shards={shards}", "--set", f"train.out_dir={out_dir}"]
    cmd = (launcher or [sys.executable]) + base + list(args)
    return run_bounded(cmd, timeout, env=env, cwd=ROOT)


def losses(run_dir) -> dict[int, float]:
    return {rec["step"]: rec["train/loss"] for rec in map(json.loads, open(run_dir / "metrics.jsonl")) if "train/loss" in rec}


def deepspeed_launcher() -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


def start(args: list[str], out_dir: Path, shards: Path, log: Path, env_extra: dict | None = None) -> subprocess.Popen:
    """The 2-process deepspeed job in its own session (so a test can signal the whole tree, as a scheduler does)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", **(env_extra or {}))
    cmd = deepspeed_launcher() + ["launch/train.py", "--config", str(TINY), "--set", f"data.shards={shards}",
                                  "--set", f"train.out_dir={out_dir}"] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if len(losses(run_dir)) >= n if (run_dir / "metrics.jsonl").is_file() else False:
            return
        assert proc.poll() is None, f"the run ended before {n} loss rows"
        time.sleep(0.2)
    raise AssertionError(f"no {n} loss rows within {limit_s}s")
