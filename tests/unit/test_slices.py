"""Evaluation slices: a hand-checked example, and the evaluation command end to end on the tiny benchmark."""

import pytest
import torch

from data_shards.folder import ShardFolder
from eval.slices import slice_masks, slice_metrics, slices_line, slices_markdown
from tests.support.fixtures import write_fixture


def test_slices_on_a_hand_checkable_example():
    # index -> (gold id, has image, description); KB descriptions (normalised) of the golds
    facts = {0: (10, True, "Capital of France."), 1: (11, True, ""), 2: (10, False, "a city"), 3: (12, False, "river  in asia")}
    kb_desc = {10: "capital of france", 11: "a person", 12: "river in asia"}
    index = torch.tensor([3, 0, 2, 1])  # rows in a different order than the indices
    ranks = torch.tensor([4, 1, 1, 2])  # ranks of mentions 3, 0, 2, 1
    ties = torch.tensor([0, 0, 2, 0])  # mention 2's gold is tied
    masks = slice_masks(index, facts, ties, frozenset({10}), kb_desc)
    m = slice_metrics(ranks, masks)
    expected = {  # name: (mentions, H@1, MRR)
        "gold_seen": (2, 100.0, 100.0),  # mentions 0, 2: ranks 1, 1
        "gold_unseen": (2, 0.0, 37.5),  # mentions 3, 1: ranks 4, 2
        "image": (2, 50.0, 75.0),  # mentions 0, 1: ranks 1, 2
        "no_image": (2, 50.0, 62.5),  # mentions 3, 2: ranks 4, 1
        "desc_is_kb": (2, 50.0, 62.5),  # mentions 3, 0 (case, punctuation and spaces ignored)
        "desc_other": (2, 50.0, 75.0),  # mentions 2, 1 (an empty description is "other")
        "tied": (1, 100.0, 100.0),
        "untied": (3, 100 / 3, 100 * (0.25 + 1 + 0.5) / 3),
    }
    for name, (n, h1, mrr) in expected.items():
        assert m[f"slice/{name}/mentions"] == n
        assert m[f"slice/{name}/H@1"] == pytest.approx(h1)
        assert m[f"slice/{name}/MRR"] == pytest.approx(mrr)
    assert slices_line(m).startswith("slices H@1/MRR: seen 100.0/100.0 unseen 0.0/37.5 | img 50.0/75.0")
    table = slices_markdown(m)
    assert "| gold unseen in train (zero-shot) | 2 | 0.00 | 37.50 |" in table
    # Without train shards or descriptions those slices are left out; empty slices are left out.
    m2 = slice_metrics(ranks, slice_masks(index, facts, torch.zeros(4, dtype=torch.long), None, None))
    assert not any(k.startswith(("slice/gold", "slice/desc", "slice/tied/")) for k in m2)
    assert m2["slice/untied/mentions"] == 4


def test_train_golds_follow_the_train_fraction(tiny_shards):
    folder = ShardFolder(tiny_shards)
    full = folder.train_golds()
    assert len(full) > 0
    half = folder.train_golds(0.3, seed=1)
    assert half < full
    assert folder.train_golds(0.3, seed=1) is half  # cached on the folder object


def test_no_train_split_no_seen_slice(tmp_path):
    from data_shards.convert import ConvertSettings, convert

    write_fixture(tmp_path / "raw", "wikimel")
    convert("wikimel", tmp_path / "raw", tmp_path / "out", ConvertSettings(image_size=16, shard_size=2, workers=1,
                                                                           splits=("test",)))
    assert ShardFolder(tmp_path / "out").train_golds() is None
