"""Dataset reader on hand-written fixtures, and the shard converter (manifest, images, errors)."""

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from data_shards import reader
from data_shards.convert import ConvertSettings, TooManyMissingImages, convert
from data_shards.folder import ShardFolder
from tests.support.fixtures import ENTITIES, SPLIT_FILES, write_fixture

SMALL = ConvertSettings(image_size=16, shard_size=2, workers=1)


@pytest.mark.parametrize("naming", sorted(SPLIT_FILES))
def test_reader_handles_every_dataset_naming(tmp_path, naming):
    dataset = naming.split("-")[0]
    facts = write_fixture(tmp_path, naming)
    qid2id = reader.read_qid2id(tmp_path)
    train = reader.read_split(tmp_path, dataset, "train", qid2id)
    assert train.skipped_nil == 1
    assert [m.id for m in train.mentions] == ["m1", "m2", "m4", "m5"]
    by_id = {m.id: m for m in train.mentions}
    assert by_id["m4"].mention == "São Paulo"  # URL-quoted in the file
    assert by_id["m4"].image_path is None  # imgPath ""
    assert by_id["m1"].image_path == facts["mention_dir"] / "m1.jpg"  # .png -> .jpg, directories dropped
    assert by_id["m5"].image_path == facts["mention_dir"] / "m5.jpg"
    assert by_id["m2"].gold_id == 3 and by_id["m2"].desc == "desc of m2"


def test_richpediamel_reads_mention_images_folder(tmp_path):
    write_fixture(tmp_path, "richpediamel")
    assert reader.mention_image_dir(tmp_path, reader.layout("richpediamel")).name == "mention_images"


def test_kb_sorted_by_id_names_unquoted_and_attr_fallback(tmp_path):
    write_fixture(tmp_path, "wikimel", mmoe_desc=False, shuffled_kb=True)
    kb = reader.read_kb(tmp_path)
    assert [e.id for e in kb] == list(range(len(ENTITIES)))
    assert [e.name for e in kb] == [name for _, name, _, _ in ENTITIES]
    assert kb[0].desc == "capital of France"  # from "attr"
    assert len(kb[3].image_paths) == 3 and kb[4].image_paths == []
    with pytest.raises(reader.KBNotSorted):
        list(reader.iter_kb(tmp_path))
    mentions = reader.read_split(tmp_path, "wikimel", "train", reader.read_qid2id(tmp_path)).mentions
    assert all(m.desc == "" for m in mentions)  # MIMIC release: no desc


def test_unknown_answer_is_an_error_naming_the_record_unless_skipped(tmp_path):
    write_fixture(tmp_path, "wikimel")
    qid2id = reader.read_qid2id(tmp_path)
    del qid2id["Q300"]
    with pytest.raises(reader.DatasetFormatError, match=r"record 0 \(id 't1'\).*Q300"):
        reader.read_split(tmp_path, "wikimel", "test", qid2id)
    out = reader.read_split(tmp_path, "wikimel", "test", qid2id, skip_unknown_answers=True)
    assert out.skipped_unknown == 1 and [m.id for m in out.mentions] == ["t2"]


def test_malformed_json_names_file_line_and_column(tmp_path):
    write_fixture(tmp_path, "wikimel")
    path = tmp_path / "WIKIMEL_dev.json"
    path.write_text('[\n  {"id": "d1", "sentence": "x",\n   "mentions": oops}\n]')
    with pytest.raises(reader.DatasetFormatError, match=r"WIKIMEL_dev\.json: malformed JSON at line 3 column 16"):
        reader.read_split(tmp_path, "wikimel", "dev", reader.read_qid2id(tmp_path))


def test_streaming_json_parser_across_chunk_boundaries(tmp_path):
    items = [{"i": i, "text": "x" * (i % 7), "n": 10**i} for i in range(40)]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(items, indent=1))
    parsed = [obj for _, obj in reader.iter_json_array(path, chunk_chars=16)]
    assert parsed == items


def test_round_trip_manifest_store_and_images(tmp_path):
    write_fixture(tmp_path / "raw", "wikimel")
    manifest = convert("wikimel", tmp_path / "raw", tmp_path / "out", SMALL)
    assert manifest["counts"] == {"entities": 6, "train": 4, "dev": 1, "test": 2}
    assert manifest["skipped"]["train"]["nil"] == 1
    assert manifest["images"]["kb"] == {"present": 5, "none": 1, "missing": 0, "unreadable": 0, "refused": 0, "examples": []}
    assert manifest["images"]["train"]["present"] == 3 and manifest["images"]["train"]["none"] == 1
    assert [s["samples"] for s in manifest["shards"]["kb"]] == [2, 2, 2]
    # Every KB shard holds entities in id order; images were resized to 16x16.
    ids = []
    for entry in manifest["shards"]["kb"]:
        with tarfile.open(tmp_path / "out" / entry["name"]) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    ids.append(json.load(tf.extractfile(m))["id"])
    assert ids == list(range(6))
    store = ShardFolder(tmp_path / "out").store()
    jordan_river = store.get(4)
    assert jordan_river["json"]["name"] == "Jordan River" and jordan_river["jpg"] is None
    assert jordan_river["json"]["image_reason"] == "none"
    sao = store.get(5)
    assert sao["json"]["name"] == "São Paulo"
    import io
    with Image.open(io.BytesIO(sao["jpg"])) as img:
        assert img.size == (16, 16) and img.format == "JPEG"
    with pytest.raises(IndexError):
        store.get(6)


def test_conversion_is_deterministic_and_leaves_no_temporary_files(tmp_path):
    write_fixture(tmp_path / "raw", "wikimel")
    first = convert("wikimel", tmp_path / "raw", tmp_path / "out", SMALL)
    second = convert("wikimel", tmp_path / "raw", tmp_path / "out", ConvertSettings(image_size=16, shard_size=2, workers=2))
    assert first["shards"] == second["shards"]  # same sha256, parallel or not
    assert not list((tmp_path / "out").rglob("*.tmp*"))
    # A re-run with bigger shards removes the shards the new manifest does not list.
    third = convert("wikimel", tmp_path / "raw", tmp_path / "out", ConvertSettings(image_size=16, shard_size=10, workers=1))
    assert sorted(p.name for p in (tmp_path / "out" / "kb").glob("*.tar")) == ["kb-000000.tar"]
    assert third["shards"]["kb"][0]["samples"] == 6


def test_renamed_image_folder_stops_the_conversion(tmp_path):
    write_fixture(tmp_path / "raw", "wikimel")
    (tmp_path / "raw" / "mention_image").rename(tmp_path / "raw" / "mention_image_old")
    with pytest.raises(TooManyMissingImages, match=r"train split \(WIKIMEL_train\.json\): 100\.0% .*m1\.jpg"):
        convert("wikimel", tmp_path / "raw", tmp_path / "out", SMALL)


def test_missing_and_unreadable_images_are_recorded_below_the_threshold(tmp_path):
    write_fixture(tmp_path / "raw", "wikimel")
    (tmp_path / "raw" / "mention_image" / "m2.jpg").unlink()
    (tmp_path / "raw" / "mention_image" / "m5.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "raw" / "kb_image" / "Q400_0.jpg").unlink()  # Michael Jordan still has two images
    manifest = convert("wikimel", tmp_path / "raw", tmp_path / "out",
                       ConvertSettings(image_size=16, shard_size=2, workers=1, max_missing=0.9))
    train = manifest["images"]["train"]
    assert (train["present"], train["missing"], train["unreadable"], train["none"]) == (1, 1, 1, 1)
    assert any("m5.jpg (unreadable" in e for e in train["examples"])
    assert manifest["images"]["kb"]["present"] == 5  # fell back to the entity's next image
    store = ShardFolder(tmp_path / "out").store()
    assert store.get(3)["jpg"] is not None
    # The existence pre-check sees 1 of 3 files missing and stops before any decoding ...
    with pytest.raises(TooManyMissingImages, match=r"33\.3% .*1 missing, 0 unreadable"):
        convert("wikimel", tmp_path / "raw", tmp_path / "out2", ConvertSettings(image_size=16, shard_size=2, workers=1))
    # ... and the check after decoding also counts the unreadable file.
    with pytest.raises(TooManyMissingImages, match=r"66\.7% .*1 missing, 1 unreadable"):
        convert("wikimel", tmp_path / "raw", tmp_path / "out3",
                ConvertSettings(image_size=16, shard_size=2, workers=1, max_missing=0.4))


def _edit(path: Path, change: Callable[[list], None]) -> None:
    records = json.loads(path.read_text())
    change(records)
    path.write_text(json.dumps(records))


def _swap_qid2id(root: Path) -> None:
    qid2id = json.loads((root / "qid2id.json").read_text())
    qid2id["Q300"], qid2id["Q400"] = qid2id["Q400"], qid2id["Q300"]
    (root / "qid2id.json").write_text(json.dumps(qid2id))


def _replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    assert old in path.read_bytes()
    path.write_bytes(path.read_bytes().replace(old, new))


TRAIN, DEV, TEST = "WIKIMEL_train.json", "WIKIMEL_dev.json", "WIKIMEL_test.json"


REFUSED = {  # a fault planted into write_fixture's wikimel folder -> the message that names it
    "qid2id swapped": (_swap_qid2id, r"maps 'Q300' to row 3, but kb_entity\.json has it at entity id 2"),
    "duplicate QID": (lambda r: _edit(r / "kb_entity.json", lambda kb: kb[4].update(qid="Q200")),
                      r"QID 'Q200' appears twice, at entity ids 1 and 4"),
    "no sentence": (lambda r: _edit(r / TRAIN, lambda x: x[0].pop("sentence")), r"record 0 \(id 'm1'\) has no 'sentence'"),
    "no answer": (lambda r: _edit(r / TEST, lambda x: x[0].pop("answer")), r"record 0 \(id 't1'\) has no 'answer'"),
    "null imgPath": (lambda r: _edit(r / TRAIN, lambda x: x[1].update(imgPath=None)), r"'imgPath' has type NoneType"),
    "integer sentence": (lambda r: _edit(r / TRAIN, lambda x: x[1].update(sentence=7)), r"'sentence' has type int"),
    "empty dev split": (lambda r: _edit(r / DEV, lambda x: x[0].update(answer="nil")), r"the dev split .* no mention to link"),
    "id twice in a split": (lambda r: _edit(r / TRAIN, lambda x: x[3].update(id="m1")),
                            rf"mention id 'm1' appears twice: \S*{TRAIN} record 0 and \S*{TRAIN} record 3"),
    "id in two splits": (lambda r: _edit(r / TEST, lambda x: x[1].update(id="m2")),
                         rf"mention id 'm2' appears twice: \S*{TRAIN} record 1 and \S*{TEST} record 1"),
    "surrogate escape": (lambda r: _replace_bytes(r / TRAIN, b"dunks", b"\\udc80dunks"),
                         rf"{TRAIN}: record 1 \(id 'm2'\): field 'sentence' holds text that is not valid Unicode"),
    "invalid UTF-8 in the KB": (lambda r: _replace_bytes(r / "kb_entity.json", b"river in", b"river \xff in"),
                                r"kb_entity\.json: entity id 4 \('Q500'\): field 'desc' .* the byte 0xff of the file"),
    "invalid UTF-8 in qid2id": (lambda r: _replace_bytes(r / "qid2id.json", b'"Q100"', b'"Q1\xe900"'),
                                r"qid2id\.json: not valid UTF-8 \(byte 0xe9"),
}


@pytest.mark.parametrize("fault", sorted(REFUSED))
def test_converter_audit_and_tokenizer_refuse_the_same_datasets_with_one_message(tmp_path, fault, capsys):
    from data_shards.audit import main as audit_main
    from data_shards.tokenizer import main as tokenizer_main

    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    plant, message = REFUSED[fault]
    plant(raw)
    with pytest.raises(reader.DatasetFormatError, match=message) as refused:
        convert("wikimel", raw, tmp_path / "shards", SMALL)
    want = f"error: {refused.value}"
    assert "\n" not in want
    with pytest.raises(SystemExit) as audit_exit:
        audit_main(["--root", str(raw), "--report", str(tmp_path / "report.json"), "--quiet"])
    with pytest.raises(SystemExit) as tokenizer_exit:
        tokenizer_main(["--root", str(raw), "--out", str(tmp_path / "tokenizer")])
    assert audit_exit.value.code == want and tokenizer_exit.value.code == want
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "tokenizer").exists()
    assert "audit of" not in capsys.readouterr().out


def test_a_json_list_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "list.json"
    path.write_bytes(b'[{"a": "caf\xe9"}]')
    with pytest.raises(reader.DatasetFormatError, match=r"list\.json: not valid UTF-8 \(byte 0xe9"):
        list(reader.iter_json_array(path))
    (_, rec), = reader.iter_json_array(path, errors="surrogateescape")  # for a record reader to name the record
    assert rec == {"a": "caf\udce9"}
