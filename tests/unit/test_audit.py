"""The dataset audit: planted duplicates, copied images and copied descriptions are found, clean data
reports none, and the de-leaked copy converts under its own name."""

import json
from pathlib import Path

from PIL import Image

from data_shards import reader
from data_shards.audit import HASH_BITS, audit, hamming, phash
from tests.support.audit import _load


def _leak_ids(leaks: dict, root: Path) -> dict[str, set]:
    out: dict[str, set] = {"dev": set(), "test": set()}
    for (split, index) in leaks:
        out[split].add(_load(root, split)[index]["id"])
    return out


def test_phash_is_robust_to_re_encoding_and_tells_images_apart(tiny_raw, tmp_path):
    a, b = sorted((tiny_raw / "kb_image").glob("*.jpg"))[:2]
    with Image.open(a) as img:
        img.convert("RGB").resize((200, 200)).save(tmp_path / "big.jpg", quality=60)
    assert hamming(phash(a), phash(tmp_path / "big.jpg")) <= 16
    assert hamming(phash(a), phash(b)) > 16
    assert phash(tmp_path / "missing.jpg") is None and 0 <= phash(a) < 2 ** HASH_BITS


def test_clean_synthetic_data_has_no_image_or_description_leaks(tiny_raw):
    report, leaks, copied = audit(tiny_raw, reader.detect_layout(tiny_raw), progress=False)
    for split in ("train", "dev", "test"):
        img = report["images"]["splits"][split]
        assert img["checked"] > 0 and img["identical"] == img["near"] == 0 and img["control_random_entity"] == 0
        assert report["descriptions"][split]["copied_from_gold"] == 0
    assert not copied
    assert all("duplicate" in r for reasons in leaks.values() for r in reasons)  # only chance duplicates, if any
    assert report["splits"]["train"]["nil"] == 3 and report["splits"]["dev"]["nil"] == 1
    gen = json.loads((tiny_raw / "generation.json").read_text())
    assert report["splits"]["train"]["records"] == gen["counts"]["splits"]["train"]["mentions"]
    train_golds = {r["answer"] for r in _load(tiny_raw, "train")}
    unseen = sum(r["answer"] not in train_golds for r in _load(tiny_raw, "test") if r["answer"] != "nil")
    assert report["unseen_golds"]["test"]["unseen_mentions"] == unseen


def test_planted_leaks_are_found(tiny_raw, planted):
    root, ids = planted
    base_report, base_leaks, _ = audit(tiny_raw, reader.detect_layout(tiny_raw), progress=False)
    report, leaks, copied = audit(root, reader.detect_layout(root), progress=False)
    found = _leak_ids(leaks, root)
    base = _leak_ids(base_leaks, tiny_raw)
    assert found["test"] - base["test"] == {"plant-exact", ids["byte"], ids["re_encoded"]}
    assert found["dev"] - base["dev"] == {"plant-near"}
    d = report["duplicates"]
    assert d["test~train"]["exact"] == base_report["duplicates"]["test~train"]["exact"] + 1
    assert d["dev~train"]["near"] == base_report["duplicates"]["dev~train"]["near"] + 1
    img = report["images"]["splits"]["test"]
    assert (img["identical"], img["near"]) == (1, 1) and report["images"]["threshold"] == 16
    assert report["descriptions"]["dev"]["copied_from_gold"] == 1 and report["descriptions"]["dev"]["examples"] == [
        f"dev {ids['desc']}"]
    assert len(copied) == 1
