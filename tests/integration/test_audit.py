"""The dataset audit: planted duplicates, copied images and copied descriptions are found, clean data
reports none, and the de-leaked copy converts under its own name."""

import json

import pytest

from data_shards import reader
from data_shards.audit import audit, main
from data_shards.convert import ConvertSettings, convert
from tests.support.audit import _load


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
