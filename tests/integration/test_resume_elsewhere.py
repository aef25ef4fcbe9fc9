"""Resuming on other hardware: a checkpoint written by 2 processes continues on 1 (grad_accum doubled, so
the global batch is the same), weights and optimizer state exactly as saved, the interrupted epoch over
exactly the samples not yet consumed (the sample-level check: tests/unit/test_stream.py)."""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics

import pytest
import torch

from moe.expert_layout import all_to_local
from tests.support.runs import BASE, deepspeed_launcher, losses, train
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


def _same(a, b, path: str = "") -> list[str]:
    """Where two loaded checkpoint files differ (tensors bit for bit, everything else by value)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [path + " (keys)"]
        return [d for k in a if k not in ("ds_config", "ds_version") for d in _same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [path + " (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _same(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def test_expert_parallel_ep_size_2_to_another_layout_and_back_is_bit_identical(tiny_shards, tmp_path):
    """A DeepSpeed-MoE checkpoint with ep_size 2 resumed with ep_size 1 (DeepSpeed backend, then the local
    backend: two copies of the one original), which writes it in that layout at once (the run is at its last
    step), then resumed with ep_size 2 again: every weight, Adam moment, step count, learning rate and schedule
    of every checkpoint file equals the original's."""
    args = BASE + ["--set", "train.max_steps=3", "--set", "model.matcher.moe.backend=deepspeed"]
    first = train(args + ["--set", "train.run_name=a", "--set", "model.matcher.moe.ep_size=2"], tmp_path, tiny_shards,
                  launcher=deepspeed_launcher())
    assert first.returncode == 0, first.stderr[-3000:]
    for backend, ep in (("deepspeed", 1), ("local", 1)):
        shutil.copytree(tmp_path / "a", tmp_path / f"b-{backend}")
        there = train(args + ["--set", f"train.run_name=b-{backend}", "--set", f"model.matcher.moe.backend={backend}",
                              "--set", f"model.matcher.moe.ep_size={ep}", "--resume", "auto"], tmp_path, tiny_shards,
                      launcher=deepspeed_launcher())
        assert there.returncode == 0, there.stderr[-3000:]
        assert (f"MoE layout backend=deepspeed, ep_size=2 -> backend={backend}, ep_size={ep} (weights, Adam moments and steps"
                in there.stderr)
        shutil.copytree(tmp_path / f"b-{backend}", tmp_path / f"c-{backend}")
        back = train(args + ["--set", f"train.run_name=c-{backend}", "--set", "model.matcher.moe.ep_size=2",
                             "--resume", "auto"], tmp_path, tiny_shards, launcher=deepspeed_launcher())
        assert back.returncode == 0, back.stderr[-3000:]
        assert f"backend={backend}, ep_size={ep} -> backend=deepspeed, ep_size=2" in back.stderr
        a, c = tmp_path / "a" / "checkpoints" / "step-0000003", tmp_path / f"c-{backend}" / "checkpoints" / "step-0000003"
        files = sorted(p.name for p in a.glob("*.pt") if not p.name.startswith("rng"))
        assert len(files) == 1 + 12 + 2 and files == sorted(p.name for p in c.glob("*.pt") if not p.name.startswith("rng"))
        for name in files:
            assert _same(load_weights_only(a / name), load_weights_only(c / name)) == [], name


def _whole(dumps: list[dict]) -> dict:
    """One state from every rank's dump (train/checkpoint_manager.py, MMOE_TEST_DUMP_FULL): the weights and
    counters of rank 0, each ZeRO group's fp32 weights and Adam moments joined over the ranks' partitions and
    cut to the group's size (the partitions are padded to the world size)."""
    whole = {k: dumps[0][k] for k in ("global_steps", "lr", "weights")}
    for i, group in enumerate(dumps[0]["partitions"]):
        for part in ("fp32", "exp_avg", "exp_avg_sq"):
            pieces = [d["partitions"][i][part] for d in dumps]
            assert all(p is not None for p in pieces), (i, part)  # every partition was stepped
            whole[f"group{i}.{part}"] = torch.cat(pieces)[:group["numel"]]
    return whole


def _differences(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys: {sorted(a.keys() ^ b.keys())}"]
    out = [k for k in ("global_steps", "lr") if a[k] != b[k]]
    out += [f"weights.{n}" for n in a["weights"] if not torch.equal(a["weights"][n], b["weights"][n])]
    return out + [k for k in a if k.startswith("group") and not torch.equal(a[k], b[k])]


def test_a_zero_1_checkpoint_moves_between_world_sizes_through_deepspeeds_universal_checkpoint(tiny_shards, tmp_path):
    """ZeRO stage 1 partitions the optimizer state by the world size: 2 -> 1 -> 2 processes re-cut it through
    DeepSpeed's universal checkpoint. Compared bit for bit: every parameter's weight, fp32 master weight and Adam
    moments gathered whole, the step counter and the learning rates, as saved and right after loading."""
    args = BASE + ["--set", "train.zero_stage=1", "--set", "train.run_name=z"]
    dump = {"MMOE_TEST_DUMP_FULL": "1"}
    at = random.Random().randint(2, 6)
    two = train(args + ["--set", "train.max_steps=24"], tmp_path, tiny_shards, launcher=deepspeed_launcher(),
                env_extra={**dump, "MMOE_TEST_SIGNAL_AT_STEP": str(at)})
    assert two.returncode == PREEMPTED_EXIT_CODE, two.stderr[-3000:]
    one = train(args + ["--set", f"train.max_steps={at + 4}", "--set", "train.grad_accum=2", "--resume", "auto"],
                tmp_path, tiny_shards, env_extra=dump)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "optimizer partitions of 2 processes re-cut for 1 through DeepSpeed's universal checkpoint" in one.stderr
    back = train(args + ["--set", f"train.max_steps={at + 6}", "--resume", "auto"], tmp_path, tiny_shards,
                 launcher=deepspeed_launcher(), env_extra=dump)
    assert back.returncode == 0, back.stderr[-3000:]
    assert "optimizer partitions of 1 processes re-cut for 2 through DeepSpeed's universal checkpoint" in back.stderr

    run = tmp_path / "z"

    def dumps(kind: str, tag: str, world: int) -> dict:
        return _whole([torch.load(run / f"{kind}-{tag}-rank{r}.pt", weights_only=True) for r in range(world)])

    for tag, saved_by, loaded_by in ((f"step-{at + 1:07d}", 2, 1), (f"step-{at + 4:07d}", 1, 2)):
        saved, loaded = dumps("saved", tag, saved_by), dumps("loaded", tag, loaded_by)
        assert len(saved["weights"]) > 50 and sum(k.startswith("group") for k in saved) >= 6
        assert _differences(saved, loaded) == [], tag
    w0, w1 = (torch.load(run / f"loaded-step-{at + 4:07d}-rank{r}.pt", weights_only=True)["weights"] for r in (0, 1))
    assert all(torch.equal(w0[n], w1[n]) for n in w0)  # both ranks of the 2-process resume hold the same weights
    got = losses(run)
    assert sorted(got) == list(range(1, at + 7)) and all(math.isfinite(v) for v in got.values())
    assert not (run / "universal-tmp").exists()  # the scratch conversion is removed once loaded


def _params(run, kind: str, tag: str, world: int, num_experts: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's whole fp32 weight and Adam moments from the ranks' dumps (experts by global id, each
    on the rank that holds it), in the local MoE layout so that layouts compare."""
    merged: dict[str, dict] = {}
    for r in range(world):
        merged.update(torch.load(run / f"{kind}-{tag}-rank{r}.pt", weights_only=True)["params"])
    parts = {p: all_to_local({n: v[p] for n, v in merged.items()}, num_experts) for p in ("fp32", "exp_avg", "exp_avg_sq")}
    return {n: {p: parts[p][n] for p in parts} for n in parts["fp32"]}


@pytest.mark.parametrize("stage, middle", [(1, "deepspeed"), (2, "local")])
def test_zero_partitions_of_deepspeed_moe_move_to_another_world_size_and_layout_and_back_bit_identically(
        tiny_shards, tmp_path, stage, middle):
    """DeepSpeed's universal checkpoint cannot re-cut its native MoE layers (DeepSpeed #5716); our merge does:
    ZeRO stage 1/2 with DeepSpeed MoE (ep_size 2) on 2 processes -> 1 process with ep_size 1 (or the local
    backend) -> 2 processes with ep_size 2. Every parameter's fp32 weight and Adam moments, the step counter and
    learning rates right after each load equal those saved, bit for bit, and training goes on finite."""
    args = BASE + ["--set", f"train.zero_stage={stage}", "--set", "train.run_name=m"]
    ds2 = ["--set", "model.matcher.moe.backend=deepspeed", "--set", "model.matcher.moe.ep_size=2"]
    dump = {"MMOE_TEST_DUMP_FULL": "1"}
    at = random.Random().randint(2, 5)
    two = train(args + ds2 + ["--set", "train.max_steps=24"], tmp_path, tiny_shards, launcher=deepspeed_launcher(),
                env_extra={**dump, "MMOE_TEST_SIGNAL_AT_STEP": str(at)})
    assert two.returncode == PREEMPTED_EXIT_CODE, two.stderr[-3000:]
    one = train(args + ["--set", f"model.matcher.moe.backend={middle}", "--set", "model.matcher.moe.ep_size=1",
                        "--set", f"train.max_steps={at + 4}", "--set", "train.grad_accum=2", "--resume", "auto"],
                tmp_path, tiny_shards, env_extra=dump)
    assert one.returncode == 0, one.stderr[-3000:]
    assert (f"MoE layout backend=deepspeed, ep_size=2 -> backend={middle}, ep_size=1; world 2 -> 1" in one.stderr
            and "the ZeRO partitions of 2 processes merged" in one.stderr), one.stderr[-3000:]
    back = train(args + ds2 + ["--set", f"train.max_steps={at + 6}", "--resume", "auto"], tmp_path, tiny_shards,
                 launcher=deepspeed_launcher(), env_extra=dump)
    assert back.returncode == 0, back.stderr[-3000:]
    assert "-> backend=deepspeed, ep_size=2; world 1 -> 2" in back.stderr, back.stderr[-3000:]

    run = tmp_path / "m"
    for tag, saved_by, loaded_by in ((f"step-{at + 1:07d}", 2, 1), (f"step-{at + 4:07d}", 1, 2)):
        saved, loaded = _params(run, "saved", tag, saved_by), _params(run, "loaded", tag, loaded_by)
        assert len(saved) > 50 and saved.keys() == loaded.keys(), tag
        assert all(v["exp_avg"] is not None for v in saved.values()) and any(".moe." in n for n in saved), tag
        differ = [f"{n}.{p}" for n in saved for p in saved[n] if not torch.equal(saved[n][p], loaded[n][p])]
        assert differ == [], (tag, differ[:8])
        counters = [{k: torch.load(run / f"{kind}-{tag}-rank0.pt", weights_only=True)[k] for k in ("global_steps", "lr")}
                    for kind in ("saved", "loaded")]
        assert counters[0]["global_steps"] == counters[1]["global_steps"] == int(tag[5:])
        assert set(counters[0]["lr"]) == set(counters[1]["lr"]), tag  # one rate, whatever the groups
    got = losses(run)
    assert sorted(got) == list(range(1, at + 7)) and all(math.isfinite(v) for v in got.values())
