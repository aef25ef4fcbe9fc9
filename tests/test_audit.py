"""The dataset audit: planted duplicates, copied images and copied descriptions are found, clean data
reports none, and the de-leaked copy converts under its own name."""

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_shards import reader
from data_shards.audit import HASH_BITS, audit, hamming, main, phash
from data_shards.convert import ConvertSettings, convert
from data_shards.synthetic import generate, preset

PATTERN = "SyntheticMEL_{split}.json"


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit") / "raw"
    generate(root, preset("tiny"), workers=1, progress=False)
    return root


def _load(root: Path, split: str) -> list[dict]:
    return json.loads((root / PATTERN.format(split=split)).read_text())


def _save(root: Path, split: str, records: list[dict]) -> None:
    (root / PATTERN.format(split=split)).write_text(json.dumps(records))


def _leak_ids(leaks: dict, root: Path) -> dict[str, set]:
    out: dict[str, set] = {"dev": set(), "test": set()}
    for (split, index) in leaks:
        out[split].add(_load(root, split)[index]["id"])
    return out


@pytest.fixture
def planted(tiny_raw, tmp_path) -> tuple[Path, dict]:
    """A copy of the tiny benchmark with leaks planted into dev and test."""
    root = tmp_path / "planted"
    shutil.copytree(tiny_raw, root)
    kb = {e["qid"]: e for e in json.loads((root / "kb_entity.json").read_text())}
    train, dev, test = (_load(root, sp) for sp in ("train", "dev", "test"))
    real = [r for r in train if r["answer"] != "nil"]
    # 1. an exact and a near duplicate (case, punctuation, spacing) of train mentions, under new ids
    test.append(dict(real[0], id="plant-exact"))
    near = dict(real[1], id="plant-near")
    near["sentence"] = "  " + near["sentence"].upper().replace(" ", " ,  ") + " !"
    dev.append(near)
    # 2. test mentions whose image is a KB image of their gold: byte copy, and resized + re-encoded
    with_img = [r for r in test if r["imgPath"] and r["answer"] != "nil" and kb[r["answer"]]["image_list"]]
    byte_copy, re_encoded = with_img[0], with_img[1]
    mdir = root / "mention_image"
    shutil.copy(root / "kb_image" / kb[byte_copy["answer"]]["image_list"][0], mdir / (Path(byte_copy["imgPath"]).stem + ".jpg"))
    with Image.open(root / "kb_image" / kb[re_encoded["answer"]]["image_list"][-1]) as img:
        buf = io.BytesIO()
        img.convert("RGB").resize((96, 96), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=70)
    (mdir / (Path(re_encoded["imgPath"]).stem + ".jpg")).write_bytes(buf.getvalue())
    # 3. a dev description copied from the gold's KB description (case changed)
    copied = next(r for r in dev if r["answer"] != "nil")
    copied["desc"] = kb[copied["answer"]]["desc"].upper()
    for sp, recs in (("dev", dev), ("test", test)):
        _save(root, sp, recs)
    return root, {"byte": byte_copy["id"], "re_encoded": re_encoded["id"], "desc": copied["id"]}


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


def test_write_clean_drops_the_leaks_and_converts_under_a_new_name(planted, tmp_path, capsys):
    root, ids = planted
    out = tmp_path / "clean"
    main(["--root", str(root), "--report", str(tmp_path / "r.json"), "--write-clean", str(out), "--clean-desc", "--quiet"])
    printed = capsys.readouterr().out
    assert "leaking dev/test mentions" in printed and "clean copy" in printed
    report = json.loads((out / "audit_report.json").read_text())
    dropped = {sp: {d["id"] for d in v} for sp, v in report["clean"]["dropped_mentions"].items()}
    assert dropped["train"] == set() and {"plant-exact", ids["byte"], ids["re_encoded"]} <= dropped["test"]
    assert "plant-near" in dropped["dev"]
    assert report["clean"]["descriptions_emptied"] == {"dev": 1}
    clean_dev = json.loads((out / "synthetic-clean_dev.json").read_text())
    assert next(r for r in clean_dev if r["id"] == ids["desc"])["desc"] == ""
    assert sum(r["answer"] == "nil" for r in clean_dev) == 1  # nil records are kept
    assert not list(out.glob("SyntheticMEL_*.json")) and (out / "kb_image").is_symlink()
    # The clean copy reports no leak, and converts (auto) under its own name.
    again, leaks, copied = audit(out, reader.detect_layout(out), progress=False)
    assert not leaks and not copied
    assert again["leaking_mentions"]["test"]["count"] == 0
    manifest = convert(reader.detect_layout(out), out, tmp_path / "shards", ConvertSettings(image_size=16, shard_size=50,
                                                                                          workers=1))
    assert manifest["dataset"] == "synthetic-clean"
    assert manifest["counts"]["test"] == len(_load(root, "test")) - 1 - len(dropped["test"])  # minus one nil


def test_cli_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="kb_entity.json not found|found no complete"):
        main(["--root", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit, match="--hash-threshold"):
        main(["--root", str(tmp_path), "--hash-threshold", "300"])


def test_write_clean_writes_only_into_a_new_empty_or_own_folder(planted, tmp_path):
    root, _ = planted
    args = ["--root", str(root), "--report", str(tmp_path / "r.json"), "--quiet", "--write-clean"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    listing = sorted(p.name for p in root.iterdir())
    for out in (foreign, root):  # someone's folder, the dataset folder: refused before the audit runs
        with pytest.raises(SystemExit, match=f"error: {out} is not empty and was not created by data_shards.audit"):
            main(args + [str(out)])
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and sorted(p.name for p in root.iterdir()) == listing
    assert not (tmp_path / "r.json").exists()
    out = root / "clean"  # inside the dataset folder: allowed, never copied into itself
    main(args + [str(out)])
    main(args + [str(out), "--clean-desc"])  # its own folder: replaced (the image links unlinked, not followed)
    assert (out / "kb_image").is_symlink() and any((root / "kb_image").iterdir()) and not (out / "clean").exists()
    assert json.loads((out / "audit_report.json").read_text())["clean"]["descriptions_emptied"] == {"dev": 1}


def test_the_report_replaces_only_an_earlier_report_and_stays_out_of_the_dataset(tiny_raw, tmp_path):
    kb = tiny_raw / "kb_entity.json"
    kb_bytes = kb.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for path, message in ((kb, f"{kb} lies in the dataset folder {tiny_raw}: the audit writes its report there only "
                               "as audit_report.json; choose that name or a file outside the dataset (nothing was written)"),
                          (tiny_raw / "other.json", f"{tiny_raw / 'other.json'} lies in the dataset folder"),
                          (notes, f"{notes} exists and is not a report of data_shards.audit: choose a new file for "
                                  "--report (nothing was written)"),
                          (tmp_path, f"{tmp_path} is a folder")):
        with pytest.raises(SystemExit) as info:
            main(["--root", str(tiny_raw), "--report", str(path), "--quiet"])
        assert str(info.value.code).startswith(f"error: {message}"), info.value.code
    assert kb.read_bytes() == kb_bytes and notes.read_text() == "mine" and not (tiny_raw / "other.json").exists()
    report = tmp_path / "report.json"
    for _ in range(2):  # a new file, then the report written there
        main(["--root", str(tiny_raw), "--report", str(report), "--quiet"])
    assert json.loads(report.read_text())["entities"] == len(json.loads(kb_bytes))
