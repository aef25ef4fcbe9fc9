"""Hard negatives: exact neighbours, no gold, stream attachment, distributed mining, resume."""

import numpy as np
import pytest
import torch

from data_shards.collate import load_tokenizer
from data_shards.folder import ShardFolder
from data_shards.stream import TrainStream, make_loader
from eval.ranking import build_index
from model.export import load_export
from model.factory import make_collator
from train.negatives import mine, nearest_negatives


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
