"""Any MIMIC-format dataset converts: --dataset auto, --split-files, the dataset name in the manifest and
the leaderboard's published numbers only for the real datasets."""

import pytest

from data_shards import reader
from data_shards.convert import ConvertSettings
from eval.leaderboard import leaderboard_markdown
from tests.support.fixtures import write_fixture

METRICS = {"H@1": 50.0, "H@3": 60.0, "H@5": 70.0, "MRR": 55.0, "MR": 3.0}


def test_auto_on_a_known_naming_keeps_the_known_name(tmp_path):
    write_fixture(tmp_path, "wikidiverse")  # wiki_diverse_{split}.json
    assert reader.detect_layout(tmp_path).name == "wikidiverse"


def test_a_new_dataset_cannot_take_a_real_datasets_name(tmp_path):
    with pytest.raises(ValueError, match="taken by a known dataset"):
        reader.custom_layout("MyArt_{split}.json", "WikiMEL")
    with pytest.raises(ValueError, match="must be a file name holding"):
        reader.custom_layout("MyArt_train.json")


def test_leaderboard_lists_published_numbers_only_for_the_real_datasets():
    real = leaderboard_markdown("wikimel", "test", METRICS, "run")
    assert "| MMoE | 90.77" in real and "**run**" in real
    for name in ("MyArt", "synthetic", "WIKIMEL-clean"):
        board = leaderboard_markdown(name, "test", METRICS, "run")
        assert "MMoE" not in board and f"No published numbers for {name}" in board


def test_convert_function_takes_a_layout(tmp_path):
    from data_shards.convert import convert

    write_fixture(tmp_path / "raw", "MyArt_{split}.json")
    lay = reader.resolve_layout("auto", tmp_path / "raw")
    manifest = convert(lay, tmp_path / "raw", tmp_path / "out", ConvertSettings(image_size=16, shard_size=2, workers=1))
    assert manifest["dataset"] == "MyArt" and manifest["skipped"]["train"]["nil"] == 1
