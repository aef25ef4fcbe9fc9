"""Multi-node launches that need no ssh, each run as two nodes on this machine (tiny preset, CPU, gloo, one
process per node), each giving the metrics rows of the 2-process single-node run of the same config
(``deepspeed --num_gpus 2``): ``deepspeed --no_ssh --node_rank R`` started twice, ``torchrun --nnodes 2``
(c10d rendezvous) started twice, and ``sbatch launch/slurm.sbatch`` on a real two-node SLURM cluster
(tests/support/slurm_cluster.py), run through and stopped by a signal (checkpoint, exit 75, re-queued, resumed).
docs/cluster.md describes the commands and what these tests check."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import ROOT, free_port
from tests.support.runs import TINY, train
from tests.support.slurm_cluster import ENDED, ClusterUnavailable, LocalSlurm

BIN = Path(sys.executable).parent
STEPS = 6
# Dev evaluated at steps 3 and 6, the best checkpoint on test at the end; DataLoader workers as in real runs.
ARGS = ["--set", f"train.max_steps={STEPS}", "--set", "train.log_every=1", "--set", "train.eval_every_epochs=0",
        "--set", "train.eval_every_steps=3", "--set", "train.test_at_end=true", "--set", "data.num_workers=2",
        "--set", "wandb.mode=disabled"]


def run_args(name: str, out_dir: Path, shards: Path) -> list[str]:
    return ["--config", str(TINY), "--set", f"data.shards={shards}", "--set", f"train.out_dir={out_dir}",
            "--set", f"train.run_name={name}", *ARGS]


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings (samples/s, mentions/s, the phase seconds and the throughput): every
    loss, learning rate, expert load and dev/test metric, one row per step and evaluation."""
    def timing(k: str) -> bool:
        return k.endswith("_per_s") or k.startswith(("time/", "throughput/"))

    return [{k: v for k, v in rec.items() if not timing(k)}
            for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def env(extra: dict | None = None) -> dict:
    """The environment of every run (SLURM passes it on to the job): one thread per rank, no W&B, no launcher
    choice or test hook from the caller's shell."""
    e = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "MMOE_LAUNCHER")}
    return {**e, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(extra or {})}


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> list[dict]:
    """The rows of the 2-process single-node run (deepspeed --num_gpus 2), which every two-node run must match."""
    out = tmp_path_factory.mktemp("reference")
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    began = time.monotonic()
    proc = train(["--set", "train.run_name=ref", *ARGS], out, tiny_shards, launcher=launcher)
    print(f"[reference] 2 processes, one node: {time.monotonic() - began:.0f}s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = rows(out / "ref")
    assert [r["step"] for r in got if "train/loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in got if "dev/MRR" in r] == [3, 6] and [r["step"] for r in got if "test/MRR" in r] == [STEPS]
    return got


def two_nodes(commands: list[list[str]], tmp_path: Path, timeout_s: float = 400) -> tuple[list[int], str, float]:
    """Start one command per node at once, each in its own session, and wait for both (bounded)."""
    procs = []
    began = time.monotonic()
    for node, cmd in enumerate(commands):
        log = (tmp_path / f"node{node}.log").open("w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [p.wait(timeout=max(1.0, timeout_s - (time.monotonic() - began))) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=30)
    logs = "\n".join(f"--- node {n}\n{(tmp_path / f'node{n}.log').read_text()[-3000:]}" for n in range(len(commands)))
    return codes, logs, time.monotonic() - began


def test_deepspeed_no_ssh_started_once_per_node_trains_like_one_node(tiny_shards, tmp_path, reference):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    cmds = [[str(BIN / "deepspeed"), "--no_ssh", "--node_rank", str(r), "--hostfile", str(hostfile), "--master_addr",
             "127.0.0.1", "--master_port", str(port), "launch/train.py", *run_args("ds", tmp_path, tiny_shards)] for r in (0, 1)]
    codes, logs, wall = two_nodes(cmds, tmp_path)
    print(f"[deepspeed --no_ssh] two nodes: {wall:.0f}s")
    assert codes == [0, 0], logs
    assert "nnodes=2, num_local_procs=1, node_rank=1" in logs  # the second command really was node 1 of 2
    assert rows(tmp_path / "ds") == reference
    assert (tmp_path / "ds" / "leaderboard-test.md").is_file()


def test_torchrun_started_once_per_node_trains_like_one_node(tiny_shards, tmp_path, reference):
    port = free_port()
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(r), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "launch/train.py",
             *run_args("tr", tmp_path, tiny_shards)] for r in (0, 1)]
    codes, logs, wall = two_nodes(cmds, tmp_path)
    print(f"[torchrun] two nodes: {wall:.0f}s")
    assert codes == [0, 0], logs
    state = json.loads(next((tmp_path / "tr" / "checkpoints").glob("step-*/complete.json")).read_text())
    assert state["layout"]["world"] == 2
    assert rows(tmp_path / "tr") == reference


# -- SLURM -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node SLURM cluster on this machine (installed with apt-get if missing). Skipped where that is not
    possible, except under CI=true, where .ci/run installs SLURM and its absence is an error."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as err:
        cluster.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs a local SLURM cluster (.ci/run installs slurm-wlm and munge): {err}")
        pytest.skip(f"no local SLURM cluster: {err}")
    yield cluster
    cluster.stop()


def submit(slurm: LocalSlurm, tmp_path: Path, shards: Path, name: str, extra_env: dict | None = None) -> tuple[int, Path]:
    """``sbatch -N2 launch/slurm.sbatch CONFIG ARGS`` from the repository root: CPU nodes (no GPUs, 1 CPU per task).

    The rendezvous port is picked free here (``MMOE_MASTER_PORT``): the script's default, 20000 + the job id, is
    the same for every test cluster's first job, and another test session or worker may hold it."""
    args = ["-N2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out", "launch/slurm.sbatch",
            str(TINY), *run_args(name, tmp_path, shards)[2:]]
    job = slurm.sbatch(args, env=env({"MMOE_MASTER_PORT": str(free_port()), **(extra_env or {})}), cwd=ROOT)
    return job, tmp_path / f"slurm-{job}.out"


def finish(slurm: LocalSlurm, job: int, log: Path, timeout_s: float = 420) -> dict:
    """Wait for the job to end (bounded); on a timeout cancel it, and fail with its output either way."""
    try:
        return slurm.wait_state(job, set(ENDED), timeout_s)
    except AssertionError as err:
        slurm.run(["scancel", str(job)], check=False)  # the fixture's stop() waits for it to end
        raise AssertionError(f"{err}\n{log.read_text()[-6000:] if log.is_file() else 'no job output'}") from None


def test_sbatch_two_nodes_trains_like_one_node(tiny_shards, tmp_path, reference, slurm):
    began = time.monotonic()
    job, log = submit(slurm, tmp_path, tiny_shards, "slurm")
    info = finish(slurm, job, log)
    print(f"[sbatch, deepspeed --no_ssh] job {job}: {time.monotonic() - began:.0f}s")
    out = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, out[-6000:])
    assert f"[slurm] job {job} attempt 1 on 2 nodes" in out and "deepspeed, rendezvous 127.0.0.1:" in out
    for node in (0, 1):
        assert f"[slurm_node {node}/2] deepspeed exited with 0" in out, out[-6000:]
    assert rows(tmp_path / "slurm") == reference
    assert (tmp_path / "slurm" / "leaderboard-test.md").is_file() and "resumed from" not in out


def test_a_signalled_sbatch_job_checkpoints_requeues_itself_and_ends_as_the_uninterrupted_run(
        tiny_shards, tmp_path, reference, slurm):
    """``scancel --signal=USR1`` (what ``#SBATCH --signal=USR1@120`` sends ahead of the time limit) reaches every
    process of the job: the launchers survive it, the ranks stop after a complete checkpoint (exit 75), the job
    re-queues itself, and the second attempt resumes and finishes with the rows of the uninterrupted run.

    With torchrun (MMOE_LAUNCHER=torchrun), which also turns the ranks' 75 into 1, so the nodes' wrappers must read
    preempted.json; the test above runs the default launcher through SLURM. The same test with
    ``launcher = "deepspeed"`` passes too (it is left out to keep the suite short)."""
    launcher = "torchrun"
    began = time.monotonic()
    job, log = submit(slurm, tmp_path, tiny_shards, "pre", {"MMOE_LAUNCHER": launcher})
    after = random.Random().randint(1, 3)  # loss rows written before the signal: it stops at a random step < 6
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and sum('"train/loss"' in line for line in metrics.read_text().splitlines()) >= after):
        assert time.monotonic() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            (slurm.job(job), log.read_text()[-6000:] if log.is_file() else "")
        time.sleep(0.2)
    slurm.run(["scancel", "--signal=USR1", str(job)])
    info = finish(slurm, job, log)
    print(f"[sbatch, {launcher}, signalled after {after} rows] job {job}: {time.monotonic() - began:.0f}s")
    out = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, out[-6000:])
    assert f"[slurm] job {job} attempt 1 on 2 nodes" in out and f"[slurm] job {job} attempt 2 on 2 nodes" in out
    for node in (0, 1):
        assert f"[slurm_node {node}/2] got SIGUSR1" in out, out[-6000:]
        assert f"[slurm_node {node}/2] preempted (launcher exit code" in out  # 75 even where torchrun returned 1
        assert f"[slurm_node {node}/2] {launcher} exited with 0" in out
    stopped = json.loads(re.search(r"\[slurm\] preempted: (\{.*\})", out).group(1))
    assert stopped["signal"] == "SIGUSR1" and after <= stopped["step"] < STEPS, (after, stopped)
    assert f"re-queued job {job}" in out and f"resumed from {stopped['checkpoint']} at step {stopped['step']}" in out
    assert "DataLoader worker" not in out  # the workers ignore the stop signal: none was killed by it
    assert rows(tmp_path / "pre") == reference
    assert (tmp_path / "pre" / "leaderboard-test.md").is_file() and not (tmp_path / "pre" / "preempted.json").exists()
