"""Streams over converted shards: round trip, exactly-once epochs across ranks and workers, resume."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from data_shards import reader
from data_shards.collate import Collator, load_tokenizer
from data_shards.convert import ConvertSettings, convert
from data_shards.folder import ShardFolder
from data_shards.stream import OrderedStream, TrainStream, _decode, make_loader, read_positions
from tests.support.fixtures import write_fixture


@pytest.fixture(scope="module")
def collator(tiny_shards):
    return Collator(load_tokenizer(tiny_shards / "tokenizer"), image_size=32, max_length=17)


def test_fixture_round_trip_reader_to_shards_to_stream(tmp_path):
    write_fixture(tmp_path / "raw", "wikidiverse-mmoe")
    convert("wikidiverse", tmp_path / "raw", tmp_path / "out", ConvertSettings(image_size=16, shard_size=2, workers=1))
    qid2id = reader.read_qid2id(tmp_path / "raw")
    for split in ("train", "dev", "test"):
        records = reader.read_split(tmp_path / "raw", "wikidiverse", split, qid2id).mentions
        shards = ShardFolder(tmp_path / "out").shard_set(split)
        streamed = [_decode(s) for s in read_positions(shards, list(range(len(shards.paths))), 0, shards.total)]
        assert [s["json"]["index"] for s in streamed] == list(range(len(records)))
        for rec, s in zip(records, streamed, strict=True):
            meta = s["json"]
            assert (meta["id"], meta["sentence"], meta["mention"], meta["desc"], meta["gold_id"], meta["answer"]) == (
                rec.id, rec.sentence, rec.mention, rec.desc, rec.gold_id, rec.answer)
            assert meta["has_image"] == (rec.image_path is not None) == (s["jpg"] is not None)
    kb = reader.read_kb(tmp_path / "raw")
    store = ShardFolder(tmp_path / "out").store()
    kb_shards = ShardFolder(tmp_path / "out").shard_set("kb")
    for ent, s in zip(kb, read_positions(kb_shards, list(range(len(kb_shards.paths))), 0, kb_shards.total), strict=True):
        meta = json.loads(s["json"])
        assert (meta["id"], meta["qid"], meta["name"], meta["desc"]) == (ent.id, ent.qid, ent.name, ent.desc)
        assert store.get(ent.id)["jpg"] == s.get("jpg")


def epoch_batches(shards, collator, *, world, rank, workers, batch_size, seed=0, epoch=0, start=0):
    ds = TrainStream(ShardFolder(shards), collator, batch_size, seed=seed, world=world, rank=rank, num_workers=workers,
                     shuffle_buffer=16)
    ds.set_position(epoch, start)
    return ds, list(make_loader(ds, workers))


@pytest.mark.parametrize("world", [2, 3])
def test_every_mention_exactly_once_per_epoch_across_ranks_and_workers(tiny_shards, collator, world):
    n = ShardFolder(tiny_shards).shard_set("train").total
    seen, pads, counts = Counter(), 0, []
    for rank in range(world):
        ds, batches = epoch_batches(tiny_shards, collator, world=world, rank=rank, workers=2, batch_size=8)
        assert len(batches) == ds.batches_per_epoch()
        counts.append(len(batches))
        for b in batches:
            assert torch.equal(b["entities"]["entity_id"], b["gold_ids"])  # gold entities from the store
            real = b["weight"] > 0
            seen.update(b["mentions"]["index"][real].tolist())
            pads += int((~real).sum())
    assert len(set(counts)) == 1, f"ranks got different batch counts {counts}: a distributed job would hang"
    assert sorted(seen) == list(range(n)) and max(seen.values()) == 1
    assert pads == world * -(-n // world) - n


def test_order_is_a_function_of_seed_and_epoch(tiny_shards, collator):
    def order(seed, epoch):
        _, batches = epoch_batches(tiny_shards, collator, world=1, rank=0, workers=2, batch_size=8, seed=seed, epoch=epoch)
        return torch.cat([b["mentions"]["index"] for b in batches]).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(0, 0))


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_continues_the_exact_sequence(tiny_shards, collator, workers):
    _, full = epoch_batches(tiny_shards, collator, world=2, rank=1, workers=workers, batch_size=8, epoch=3)
    for start in (1, 5, len(full) - 1):
        _, rest = epoch_batches(tiny_shards, collator, world=2, rank=1, workers=workers, batch_size=8, epoch=3, start=start)
        assert [b["mentions"]["index"].tolist() for b in rest] == [b["mentions"]["index"].tolist() for b in full[start:]]
        torch.testing.assert_close(rest[0]["mentions"]["pixel_values"], full[start]["mentions"]["pixel_values"])


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_ordered_streams_cover_kb_and_split_in_order_across_ranks(tiny_shards, collator, workers):
    """In dataset order as they arrive, whatever the DataLoader workers (the caches' rows are taken in arrival
    order: contiguous blocks per worker arrived interleaved and failed the KB's order check)."""
    kb_ids, mention_ids = [], []
    folder = ShardFolder(tiny_shards)
    for rank in range(2):
        kb_ids += [b["entity_id"] for b in make_loader(OrderedStream(folder, "kb", collator, 16, 2, rank), workers)]
        mention_ids += [b["index"] for b in make_loader(OrderedStream(folder, "test", collator, 8, 2, rank), workers)]
    assert torch.equal(torch.cat(kb_ids), torch.arange(len(folder.store())))
    assert torch.equal(torch.cat(mention_ids), torch.arange(folder.shard_set("test").total))


def test_collation_texts_images_and_desc_switch(tiny_shards, collator):
    ds, batches = epoch_batches(tiny_shards, collator, world=1, rank=0, workers=0, batch_size=4)
    b = batches[0]["mentions"]
    assert b["input_ids"].shape == (4, 17) and b["pixel_values"].shape == (4, 3, 32, 32)
    tok = collator.tokenizer
    assert (b["input_ids"][:, 0] == tok.bos_token_id).all()
    sample = {"mention": "abc", "sentence": "the abc river", "desc": "a long river"}
    assert collator.mention_text(sample) == "abc [SEP] the abc river [SEP] a long river"
    no_desc = Collator(tok, 32, 17, mention_desc=False, entity_desc=False)
    assert no_desc.mention_text(sample) == "abc [SEP] the abc river"
    assert no_desc.entity_text({"name": "abc", "desc": "a long river"}) == "abc"
    # The paper's "w/o DME" ablation removes the mention's description only.
    wo_dme = Collator(tok, 32, 17, mention_desc=False)
    assert wo_dme.mention_text(sample) == "abc [SEP] the abc river"
    assert wo_dme.entity_text({"name": "abc", "desc": "a long river"}) == "abc [SEP] a long river"
    # Rows without an image are zero and masked out.
    assert (b["pixel_values"][~b["image_mask"]] == 0).all()


def test_normalisation_is_the_clip_formula_bit_for_bit_in_a_contiguous_buffer(collator):
    raw = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = (torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255.0 - collator.mean) / collator.std
    got = collator.normalise(raw)
    assert got.is_contiguous() and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert not torch.equal(got[0], got[1])  # each row is its own image


def test_train_fraction_is_a_seeded_subset_seen_exactly_once(tiny_shards, collator):
    n = ShardFolder(tiny_shards).shard_set("train").total
    seen = []
    for rank in range(2):
        ds = TrainStream(ShardFolder(tiny_shards), collator, 8, seed=5, world=2, rank=rank, num_workers=2, fraction=0.2)
        for b in make_loader(ds, 2):
            seen += b["mentions"]["index"][b["weight"] > 0].tolist()
    assert len(seen) == len(set(seen)) == round(0.2 * n)
    again = TrainStream(ShardFolder(tiny_shards), collator, 8, seed=5, world=1, rank=0, fraction=0.2)
    assert sorted(seen) == sorted(torch.cat([b["mentions"]["index"] for b in make_loader(again, 0)]).tolist())
    other = TrainStream(ShardFolder(tiny_shards), collator, 8, seed=6, world=1, rank=0, fraction=0.2)
    assert sorted(seen) != sorted(torch.cat([b["mentions"]["index"] for b in make_loader(other, 0)]).tolist())


def test_train_fraction_first_takes_the_first_mentions_in_file_order(tiny_shards, collator):
    n = ShardFolder(tiny_shards).shard_set("train").total
    take = round(0.3 * n)
    ds = TrainStream(ShardFolder(tiny_shards), collator, 8, seed=5, world=1, rank=0, fraction=0.3, fraction_mode="first")
    seen = torch.cat([b["mentions"]["index"][b["weight"] > 0] for b in make_loader(ds, 0)]).tolist()
    assert sorted(seen) == list(range(take))


def _real_ids(batches) -> list[int]:
    return [i for b in batches for i in b["mentions"]["index"][b["weight"] > 0].tolist()]


@pytest.mark.parametrize("new_world,new_workers", [(1, 0), (1, 2), (3, 2)])
def test_an_epoch_interrupted_on_one_world_continues_on_another_over_exactly_the_unconsumed_samples(
        tiny_shards, collator, new_world, new_workers):
    """Resume on other hardware: 2 ranks x 2 workers consumed 5 batches each; the rest of the epoch on
    ``new_world`` ranks holds every other mention exactly once, and every rank gets the same batch count."""
    n = ShardFolder(tiny_shards).shard_set("train").total
    old = {"world": 2, "batch_size": 8, "num_workers": 2, "batches": 5, "shuffle_buffer": 16}
    consumed = []
    for rank in range(2):
        _, batches = epoch_batches(tiny_shards, collator, world=2, rank=rank, workers=2, batch_size=8, epoch=1)
        consumed += _real_ids(batches[:5])
    assert len(consumed) == len(set(consumed)) == 80
    rest, counts = [], []
    for rank in range(new_world):
        ds = TrainStream(ShardFolder(tiny_shards), collator, 8, world=new_world, rank=rank, num_workers=new_workers,
                         shuffle_buffer=16)
        ds.set_position(1, 0, [old])
        batches = list(make_loader(ds, new_workers))
        assert len(batches) == ds.batches_per_epoch()
        counts.append(len(batches))
        rest += _real_ids(batches)
    assert len(set(counts)) == 1
    assert sorted(rest) == sorted(set(range(n)) - set(consumed)) and len(rest) == len(set(rest))

    # A second change inside the same epoch (1 rank, 3 batches, then 2 ranks) still covers each mention once.
    one = {"world": 1, "batch_size": 8, "num_workers": 0, "batches": 3, "shuffle_buffer": 16}
    ds = TrainStream(ShardFolder(tiny_shards), collator, 8, world=1, rank=0, num_workers=0, shuffle_buffer=16)
    ds.set_position(1, 0, [old])
    middle = _real_ids(list(make_loader(ds, 0))[:3])
    last = []
    for rank in range(2):
        ds = TrainStream(ShardFolder(tiny_shards), collator, 8, world=2, rank=rank, num_workers=2, shuffle_buffer=16)
        ds.set_position(1, 0, [old, one])
        last += _real_ids(list(make_loader(ds, 2)))
    assert sorted(consumed + middle + last) == list(range(n))
