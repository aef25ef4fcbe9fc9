"""The DeepSpeed-MoE backend (model.matcher.moe.backend: deepspeed) and expert parallelism (CPU, gloo).

Parity with the local layer at ep_size 1 (one process) and 2 (two processes, tests/support/ep_parity_worker.py),
ZeRO 0/1/2 training equal to local data-parallel training, a 2-process ep_size 2 training run with
kill and exact resume, the export in the local layout, checkpoint conversion and one-process evaluation.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.helpers import ROOT, free_port
from tests.support.runs import TINY
from train.checkpointing import export_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


TOL = 1e-5


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    e.pop("WANDB_MODE", None)
    e.pop("WANDB_API_KEY", None)
    e.update(extra)
    return e


def check_report(path: Path, world: int) -> list[dict]:
    report = json.loads(path.read_text())
    assert report["world"] == world
    for rank, res in enumerate(report["ranks"]):
        diffs = {k: v for k, v in res.items() if k.startswith(("layer/", "model/"))}
        assert diffs, "no parity checks ran"
        bad = {k: v for k, v in diffs.items() if v > TOL}
        assert not bad, f"rank {rank}: DeepSpeed backend differs from the local layer: {bad}"
    return report["ranks"]


def test_parity_with_the_local_layer_in_one_process(tmp_path):
    out = tmp_path / "parity1.json"
    proc = subprocess.run([sys.executable, "tests/support/ep_parity_worker.py", str(out)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (res,) = check_report(out, 1)
    assert any(k.startswith("layer/ep1/k3/drop1/gate5/") for k in res)
    assert res["model/ep1/restored"] == 0.0


def test_parity_at_ep_size_2_and_zero_stages_match_data_parallel_training(tmp_path):
    out = tmp_path / "parity2.json"
    proc = subprocess.run(TORCHRUN + ["--master_port", str(free_port()), "tests/support/ep_parity_worker.py", str(out)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = check_report(out, 2)
    for res in ranks:
        assert any(k.startswith("layer/ep2/") for k in res)
        # matcher, clip, and their no-decay halves (biases: weight decay 0, as published)
        assert res["train/local/moe_groups"] == 0 and res["train/local/lrs"] == [1e-3, 5e-4, 1e-3, 5e-4]
        for stage in (0, 1, 2):
            name = f"train/ep2_zero{stage}"
            # Expert parameters in their own 'moe' groups (weights, biases); the matcher/CLIP learning rates are kept.
            assert res[f"{name}/moe_groups"] == 2 and res[f"{name}/lrs"] == [1e-3, 5e-4, 1e-3, 5e-4, 1e-3, 1e-3]
            assert res[f"{name}/moved"] > 1e-4
            assert res[f"{name}/vs_local"] < TOL, f"ZeRO {stage}: expert-parallel training differs from data parallel"
            assert res[f"{name}/dense_rank_diff"] == 0.0  # non-expert parameters identical on both ranks
            assert res[f"{name}/expert_rank_diff"] > 0.0  # each rank holds other experts


def train(args, out_dir, shards, port, extra_env=None, nproc=2):
    base = ["launch/train.py", "--config", str(TINY), "--set", f"data.shards={shards}", "--set", f"train.out_dir={out_dir}",
            "--set", "model.matcher.moe.backend=deepspeed", "--set", "train.run_name=ep", "--set", "train.eval_every_epochs=0",
            "--set", "train.test_at_end=false", "--set", "train.log_every=1"]
    launcher = TORCHRUN + ["--master_port", str(port)] if nproc == 2 else [sys.executable]
    return subprocess.run(launcher + base + list(args), cwd=ROOT, env=env(**(extra_env or {})), capture_output=True,
                          text=True, timeout=300)


def records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_two_processes_train_with_ep_size_2_resume_exactly_and_export_for_one_process(tiny_shards, tmp_path):
    run_dir, ckpts = tmp_path / "ep", tmp_path / "ep" / "checkpoints"
    # Hard negatives are mined at the start (collective over the expert-parallel ranks' local copies).
    negatives = ["--set", "negatives.enabled=true", "--set", "negatives.warmup_epochs=0", "--set", "negatives.top_k=5"]
    ep2 = ["--set", "model.matcher.moe.ep_size=2", "--set", "train.save_every_steps=3"] + negatives
    first = train(ep2 + ["--set", "train.max_steps=6"], tmp_path, tiny_shards, free_port(),
                  {"MMOE_TEST_KILL_AT_STEP": "6", "MMOE_TEST_DUMP_STATE": "1"})
    assert first.returncode != 0 and (ckpts / "step-0000006" / "complete.json").is_file(), first.stderr[-4000:]
    killed = {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}
    assert sorted(killed) == list(range(1, 7))
    assert json.loads((ckpts / "step-0000006" / "moe-layout.json").read_text()) == {
        "backend": "deepspeed", "ep_size": 2, "num_experts": 4}
    # DeepSpeed wrote one file per (layer, global expert): 3 switch layers (text, vision, cross) x 4 experts.
    assert len(list((ckpts / "step-0000006").glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 12
    r0, r1 = (torch.load(ckpts / "step-0000006" / f"state-rank{r}.pt") for r in (0, 1))
    dense = [k for k in r0 if "deepspeed_experts" not in k]
    experts = [k for k in r0 if "deepspeed_experts" in k]
    assert dense and experts
    assert all(torch.equal(r0[k], r1[k]) for k in dense), "non-expert parameters diverged across ranks"
    assert not any(torch.equal(r0[k], r1[k]) for k in experts), "ranks should hold different experts"

    # The same model trained data-parallel with the local backend (same seed, same batches) logs the
    # same first-step loss and global gradient norm: the expert-parallel norm sums every rank's experts.
    local = train(["--set", "model.matcher.moe.backend=local", "--set", "train.run_name=local", "--set", "train.max_steps=1"]
                  + negatives, tmp_path, tiny_shards, free_port())
    assert local.returncode == 0, local.stderr[-4000:]
    ref = next(r for r in records(tmp_path / "local") if r.get("step") == 1 and "train/loss" in r)
    ep_first = next(r for r in records(run_dir) if r.get("step") == 1 and "train/loss" in r)
    assert ep_first["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-5)
    assert ep_first["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-4)

    # Another layout (one process, ep_size 1) resumes a copy of the run, converting experts and optimizer state
    # (train/relayout.py; the bit-for-bit round trip is tests/integration/test_resume_elsewhere.py) and re-planning the epoch.
    shutil.copytree(run_dir, tmp_path / "moved" / "ep")
    other = train(["--set", "train.max_steps=6", "--resume", "auto"], tmp_path / "moved", tiny_shards, 0, nproc=1)
    assert other.returncode == 0, other.stderr[-4000:]
    assert ("MoE layout backend=deepspeed, ep_size=2 -> backend=deepspeed, ep_size=1; world 2 -> 1 (weights, Adam "
            "moments") in other.stderr
    assert "resumed on another layout (world 2 -> 1)" in other.stderr

    # Resume from step 3 (drop step 6's completion marker) and continue to step 8.
    (ckpts / "step-0000006" / "complete.json").unlink()
    resumed = train(ep2 + ["--set", "train.max_steps=8", "--set", "train.test_at_end=true", "--resume", "auto"], tmp_path,
                    tiny_shards, free_port(), {"MMOE_TEST_DUMP_STATE": "1"})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "[eval test] H@1" in resumed.stdout  # the best export, evaluated with every expert on every rank
    assert "step-0000003" in resumed.stderr
    recs = records(run_dir)
    losses = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}  # the resumed run's values win
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(killed[step], rel=1e-6, abs=1e-7), f"step {step} differs after resume"
    assert sorted(losses) == list(range(1, 9))
    assert sum(losses[s] for s in (7, 8)) < sum(losses[s] for s in (1, 2)), losses
    loads = [r for r in recs if "moe/cross/expert0" in r]
    assert loads and all(sum(r[f"moe/cross/expert{e}"] for e in range(4)) == pytest.approx(1.0) for r in loads)

    # The best export (written at step 8) is in the local layout with every expert, gathered from both ranks.
    from safetensors.torch import load_file

    export = load_file(str(run_dir / "best" / "model.safetensors"))
    assert "backend: local" in (run_dir / "best" / "config.yaml").read_text()
    s0, s1 = (torch.load(ckpts / "step-0000008" / f"state-rank{r}.pt") for r in (0, 1))
    w1 = export["matcher.units.cross.moe.w1"]
    assert w1.shape[0] == 4
    for rank, state in enumerate((s0, s1)):
        for i in range(2):
            key = f"matcher.units.cross.moe.deepspeed_moe.experts.deepspeed_experts.{i}.fc1.weight"
            assert torch.equal(w1[2 * rank + i], state[key].t())
    # Any checkpoint converts to the same export offline (no DeepSpeed, no process group).
    export_checkpoint(ckpts / "step-0000008", tmp_path / "converted")
    converted = load_file(str(tmp_path / "converted" / "model.safetensors"))
    assert converted.keys() == export.keys() and all(torch.equal(converted[k], export[k]) for k in export)

    # One-process evaluation of the export gives the dev MRR the 2-process run measured.
    ev = subprocess.run([sys.executable, "-m", "eval.evaluate", "--checkpoint", str(run_dir / "best"), "--split", "dev",
                         "--out", str(tmp_path / "eval")], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-4000:]
    dev = [r["dev/MRR"] for r in recs if "dev/MRR" in r][-1]
    result = json.loads((tmp_path / "eval" / "results-dev.json").read_text())
    assert result["world_size"] == 1
    assert result["metrics"]["MRR"] == pytest.approx(dev, abs=1e-4)
