"""Any MIMIC-format dataset converts: --dataset auto, --split-files, the dataset name in the manifest and
the leaderboard's published numbers only for the real datasets."""

import json
import shutil

import pytest

from data_shards import reader
from data_shards.convert import main
from tests.support.fixtures import write_fixture

SMALL = ["--image-size", "16", "--shard-size", "2", "--workers", "1"]


def test_auto_detects_a_new_prefix_and_mention_images_folder(tmp_path, capsys):
    write_fixture(tmp_path / "raw", "MyArt_{split}.json", mention_dir="mention_images")
    main(["--dataset", "auto", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), *SMALL])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dataset"] == "MyArt"
    assert manifest["source"]["split_files"] == "MyArt_{split}.json"
    assert manifest["source"]["mention_images"] == "mention_images"
    assert manifest["counts"] == {"entities": 6, "train": 4, "dev": 1, "test": 2}
    assert manifest["images"]["train"]["present"] == 3  # found in mention_images/, not counted missing
    assert "dataset MyArt" in capsys.readouterr().out


def test_explicit_split_files_and_dataset_name(tmp_path):
    write_fixture(tmp_path / "raw", "art-v2.{split}.json")
    main(["--split-files", "art-v2.{split}.json", "--dataset-name", "artworks", "--root", str(tmp_path / "raw"),
          "--out", str(tmp_path / "out"), *SMALL])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dataset"] == "artworks" and manifest["source"]["splits"]["dev"] == "art-v2.dev.json"


def test_auto_refuses_zero_or_several_families_and_lists_them(tmp_path):
    write_fixture(tmp_path / "raw", "MyArt_{split}.json")
    for split in ("train", "dev", "test"):
        shutil.copy(tmp_path / "raw" / f"MyArt_{split}.json", tmp_path / "raw" / f"Other_{split}.json")
    with pytest.raises(reader.DatasetFormatError, match=r"found 2 complete .*MyArt_\{train,dev,test\}.*Other_.*--split-files"):
        reader.detect_layout(tmp_path / "raw")
    for split in ("train", "dev", "test"):
        (tmp_path / "raw" / f"Other_{split}.json").unlink()
    (tmp_path / "raw" / "MyArt_test.json").unlink()
    with pytest.raises(SystemExit, match=r"found no complete .*MyArt_\{train,dev\}\.json"):
        main(["--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), *SMALL])
