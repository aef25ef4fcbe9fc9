"""Hard negatives: exact neighbours, no gold, stream attachment, distributed mining, resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_shards.collate import load_tokenizer
from data_shards.folder import ShardFolder
from data_shards.stream import TrainStream, make_loader
from eval.ranking import build_index
from model.export import load_export
from model.factory import make_collator
from tests.helpers import free_port
from tests.test_trainer import ROOT, losses, train
from train.negatives import load_table, mine, nearest_negatives


def test_mined_neighbours_are_the_true_nearest_without_gold_or_same_qid():
    rng = np.random.default_rng(0)
    entities = torch.from_numpy(rng.normal(size=(50, 8)).astype(np.float32))
    mentions = torch.from_numpy(rng.normal(size=(7, 8)).astype(np.float32))
    gold = np.array([0, 3, 3, 10, 49, 20, 21])
    qids = {i: f"Q{i}" for i in range(50)}
    qids[11] = "Q10"  # entity 11 is the same WikiData item as entity 10 (mention 3's gold)
    table = nearest_negatives(mentions, build_index(entities), gold, top_k=5, qid_of=lambda ids: qids)
    scores = (mentions @ entities.T).numpy()
    for r in range(7):
        order = [int(e) for e in np.argsort(-scores[r], kind="stable") if e != gold[r] and qids[e] != qids[gold[r]]]
        assert table[r].tolist() == order[:5]
    assert 11 not in table[3]


def test_short_rows_are_padded_with_minus_one():
    entities = torch.eye(3)
    table = nearest_negatives(torch.ones(1, 3), build_index(entities), np.array([1]), top_k=4)
    assert sorted(table[0, :2].tolist()) == [0, 2] and table[0, 2:].tolist() == [-1, -1]


def test_mined_lists_never_contain_the_gold(tiny_export, tiny_shards):
    model, cfg = load_export(tiny_export)
    table, stats = mine(model, cfg, torch.device("cpu"), make_collator(cfg, model))
    n = ShardFolder(tiny_shards).shard_set("train").total
    assert table.shape == (n, 10) and stats["mentions"] == n
    golds = np.zeros(n, dtype=np.int64)
    for b in make_loader(TrainStream(ShardFolder(tiny_shards), make_collator(cfg, model), 64), 0):
        golds[b["mentions"]["index"].numpy()] = b["gold_ids"].numpy()
    assert not (table == golds[:, None]).any()
    store = ShardFolder(tiny_shards).store()
    qid = {i: store.get(i)["json"]["qid"] for i in range(len(store))}
    assert all(qid[int(e)] != qid[int(g)] for row, g in zip(table, golds, strict=True) for e in row if e >= 0)


def test_stream_attaches_the_batch_hard_negatives(tiny_shards):
    collator = make_collator_for(tiny_shards)
    n = ShardFolder(tiny_shards).shard_set("train").total
    table = (np.arange(n)[:, None] * 7 + np.arange(4)[None, :]) % 200  # a known fake table
    ds = TrainStream(ShardFolder(tiny_shards), collator, 8, seed=3)
    ds.set_negatives(table, 2, "top")
    batch = next(iter(make_loader(ds, 0)))
    idx = batch["mentions"]["index"].tolist()
    expected = list(dict.fromkeys(int(e) for i in idx for e in table[i, :2]))
    assert batch["candidate_ids"].tolist() == batch["gold_ids"].tolist() + expected
    assert torch.equal(batch["entities"]["entity_id"], batch["candidate_ids"])
    ds.set_negatives(table, 2, "random")
    first = next(iter(make_loader(ds, 0)))["candidate_ids"]
    again = next(iter(make_loader(ds, 0)))["candidate_ids"]
    assert torch.equal(first, again)  # seeded by (seed, epoch, mention)
    with pytest.raises(ValueError, match="rows"):
        ds.set_negatives(table[:5], 1)


def make_collator_for(shards):
    from data_shards.collate import Collator

    return Collator(load_tokenizer(shards / "tokenizer"), image_size=32, max_length=17)


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
