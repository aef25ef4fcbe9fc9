"""Fault injection on the data path (conversion, shards, images, records, the DME client, model and data
identity): every fault is either a clear error that names what is wrong or a counted, reported skip; none
gives a silently wrong result."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards.convert import ConvertSettings, TooManyMissingImages, convert
from data_shards.folder import ShardFolder
from data_shards.images import prepare_image
from data_shards.reader import DatasetFormatError
from tests.support.data_faults import _cut_at_sample_boundary, _manifest
from tests.support.fixtures import write_fixture

SMALL = ConvertSettings(image_size=16, shard_size=2, workers=1)


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_consistent(out: Path) -> None:
    """Every shard the manifest lists has the manifest's sha256, and no other shard is there."""
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {e["name"]: e["sha256"] for group in manifest["shards"].values() for e in group}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.tar")}
    assert on_disk == set(listed)
    for name, sha in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.rglob("*") if ".tmp" in p.name or ".building-" in p.name or ".old-" in p.name]


def test_conversion_failing_after_writing_shards_leaves_the_previous_output_untouched(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_fixture(raw, "wikimel")
    convert("wikimel", raw, out, SMALL)
    before = _tree(out)
    # Files that exist (the cheap pre-check passes) but do not decode: the threshold is exceeded
    # only after every shard was written.
    for p in (raw / "kb_image").glob("*.jpg"):
        p.write_bytes(b"not an image")
    with pytest.raises(TooManyMissingImages, match="KB"):
        convert("wikimel", raw, out, ConvertSettings(image_size=16, shard_size=3, workers=1))
    assert _tree(out) == before
    _assert_consistent(out)
    _no_leftovers(tmp_path)


def test_conversion_crashing_part_way_with_workers_leaves_the_previous_output_untouched(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_fixture(raw, "wikimel")
    convert("wikimel", raw, out, SMALL)
    before = _tree(out)
    test_file = raw / "WIKIMEL_test.json"  # the last group written: kb, train and dev shards are done by then
    test_file.write_text(test_file.read_text().replace("Air Jordan", "Air \\ud800 Jordan"))
    with pytest.raises(DatasetFormatError, match=r"WIKIMEL_test\.json: record 1 \(id 't2'\): field 'sentence'.*not valid"):
        convert("wikimel", raw, out, ConvertSettings(image_size=16, shard_size=1, workers=2))
    assert _tree(out) == before
    _no_leftovers(tmp_path)


def test_a_stale_tokenizer_never_survives_a_new_conversion(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_fixture(raw, "wikimel")
    (raw / "tokenizer").mkdir()
    (raw / "tokenizer" / "tokenizer.json").write_text("{}")
    manifest = convert("wikimel", raw, out, SMALL)
    assert manifest["tokenizer"] == "tokenizer" and (out / "tokenizer" / "tokenizer.json").is_file()
    shutil.rmtree(raw / "tokenizer")
    manifest = convert("wikimel", raw, out, SMALL)
    assert "tokenizer" not in manifest and not (out / "tokenizer").exists()
    _assert_consistent(out)


def test_conversion_refuses_to_replace_a_folder_that_is_not_a_shards_folder(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        convert("wikimel", raw, tmp_path / "mine", SMALL)
    with pytest.raises(ValueError, match="dataset folder"):
        convert("wikimel", raw, tmp_path, SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _decoded(jpg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpg)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_grayscale_is_scaled_not_white(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 65535, 32), (32, 1))  # dark on the left, bright on the right
    if mode == "I;16":
        img = Image.fromarray(ramp.astype(np.uint16))
        path = tmp_path / "gray16.png"
    elif mode == "I":
        img = Image.fromarray(ramp.astype(np.int32), mode="I")
        path = tmp_path / "gray32.tif"
    else:
        img = Image.fromarray((ramp / 65535).astype(np.float32), mode="F")
        path = tmp_path / "float.tif"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    jpg, reason = prepare_image(path, 16, 95)
    assert reason == ""
    px = _decoded(jpg)
    assert abs(px.mean() - 127.5) < 12  # mid-gray on average, not 255
    assert px[:, :3].mean() < 40 and px[:, -3:].mean() > 215  # the ramp survives


def test_sixteen_bit_png_in_the_shards_and_in_link(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    Image.fromarray(np.full((30, 40), 32768, np.uint16)).save(raw / "kb_image" / "Q100_0.jpg", format="PNG")
    convert("wikimel", raw, tmp_path / "out", SMALL)
    entity = ShardFolder(tmp_path / "out").store().get(0)
    assert abs(_decoded(entity["jpg"]).mean() - 127.5) < 4
    # eval.link prepares its query image with the same function (no folder confinement for a user's own file).
    from eval import link

    assert link.prepare_image is prepare_image


def test_image_paths_escaping_the_image_folder_are_refused(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    outside = tmp_path / "secret.jpg"
    shutil.copy(raw / "kb_image" / "Q100_0.jpg", outside)
    os.symlink(outside, raw / "kb_image" / "link.jpg")
    os.symlink(raw / "kb_image" / "Q200_0.jpg", raw / "kb_image" / "inner_link.jpg")  # stays inside: fine
    os.mkfifo(raw / "kb_image" / "pipe.jpg")
    kb = json.loads((raw / "kb_entity.json").read_text())
    kb[0]["image_list"] = ["../../secret.jpg"]
    kb[1]["image_list"] = [str(outside)]
    kb[2]["image_list"] = ["link.jpg"]
    kb[3]["image_list"] = ["pipe.jpg"]
    kb[5]["image_list"] = ["inner_link.jpg"]
    (raw / "kb_entity.json").write_text(json.dumps(kb))
    (raw / "mention_image" / "m1.jpg").unlink()
    os.symlink(outside, raw / "mention_image" / "m1.jpg")  # a mention image leading out of its folder
    done: list[dict] = []
    worker = threading.Thread(target=lambda: done.append(convert(
        "wikimel", raw, tmp_path / "out", ConvertSettings(image_size=16, shard_size=2, workers=1, max_missing=0.9))),
        daemon=True)
    worker.start()
    worker.join(60)
    assert done, "the conversion hung (a FIFO was opened?)"
    kb_stats = done[0]["images"]["kb"]
    assert kb_stats["refused"] == 4 and kb_stats["present"] == 1 and kb_stats["none"] == 1
    assert done[0]["images"]["train"]["refused"] == 1 and "m1.jpg (refused: outside mention_image/)" in \
        done[0]["images"]["train"]["examples"][0]
    store = ShardFolder(tmp_path / "out").store()
    for i in range(4):
        meta = store.get(i)
        assert meta["jpg"] is None and meta["json"]["image_reason"].startswith("refused")
    assert "not a regular file" in store.get(3)["json"]["image_reason"]
    assert store.get(5)["jpg"] is not None


def test_duplicate_qid_in_the_kb_is_an_error_naming_both_records(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    kb = json.loads((raw / "kb_entity.json").read_text())
    kb[4]["qid"] = "Q200"
    (raw / "kb_entity.json").write_text(json.dumps(kb))
    with pytest.raises(DatasetFormatError, match=r"QID 'Q200' appears twice, at entity ids 1 and 4"):
        convert("wikimel", raw, tmp_path / "out", SMALL)


def test_qid2id_disagreeing_with_the_kb_is_an_error_naming_the_record(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    qid2id = json.loads((raw / "qid2id.json").read_text())
    qid2id["Q300"], qid2id["Q400"] = qid2id["Q400"], qid2id["Q300"]  # two rows swapped
    (raw / "qid2id.json").write_text(json.dumps(qid2id))
    with pytest.raises(DatasetFormatError, match=r"maps 'Q300' to row 3, but kb_entity\.json has it at entity id 2"):
        convert("wikimel", raw, tmp_path / "out", SMALL)


def test_unencodable_kb_text_names_the_record_and_leaves_no_temporary_files(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    kb_file = raw / "kb_entity.json"
    kb_file.write_text(kb_file.read_text().replace("river in the Middle East", "river \\udc80 East"))
    with pytest.raises(DatasetFormatError, match=r"kb_entity\.json: entity id 4 \('Q500'\): field 'desc'"):
        convert("wikimel", raw, tmp_path / "out", SMALL)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_an_empty_split_is_refused_with_its_name(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    dev = json.loads((raw / "WIKIMEL_dev.json").read_text())
    dev[0]["answer"] = "nil"
    (raw / "WIKIMEL_dev.json").write_text(json.dumps(dev))
    with pytest.raises(DatasetFormatError, match=r"the dev split \(.*WIKIMEL_dev\.json\) has no mention to link \(1 nil"):
        convert("wikimel", raw, tmp_path / "out", SMALL)


def _collator(shards: Path):
    from data_shards.collate import Collator, load_tokenizer

    return Collator(load_tokenizer(shards / "tokenizer"), 32, 17)


def test_a_dev_shard_cut_in_half_stops_the_ordered_stream(shards_copy):
    from data_shards.store import ShardError
    from data_shards.stream import OrderedStream

    entry = _manifest(shards_copy)["shards"]["dev"][0]
    path = shards_copy / entry["name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    stream = OrderedStream(ShardFolder(shards_copy), "dev", _collator(shards_copy), batch_size=8)
    with pytest.raises(ShardError, match=rf"{entry['name']}.*(truncated|damaged)"):
        for _ in stream:
            pass


def test_a_train_shard_cut_at_a_sample_boundary_stops_the_train_stream(shards_copy):
    from data_shards.store import ShardError
    from data_shards.stream import TrainStream

    entry = _manifest(shards_copy)["shards"]["train"][1]
    _cut_at_sample_boundary(shards_copy / entry["name"], keep=entry["samples"] - 3)
    stream = TrainStream(ShardFolder(shards_copy), _collator(shards_copy), batch_size=16, shuffle_buffer=4)
    with pytest.raises(ShardError, match=rf"{entry['name']} holds {entry['samples'] - 3} samples but the manifest lists "
                                         rf"{entry['samples']}"):
        for _ in stream:
            pass


def test_a_truncated_kb_shard_is_refused_by_the_entity_store(shards_copy):
    from data_shards.store import ShardError

    entry = _manifest(shards_copy)["shards"]["kb"][2]
    path = shards_copy / entry["name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardError, match=rf"{entry['name']} is truncated"):
        ShardFolder(shards_copy).store()


def test_verify_command_lists_every_bad_file(shards_copy, capsys):
    from data_shards.verify import main as verify_main

    assert verify_main([str(shards_copy), "--quiet"]) == 0
    assert "files match manifest.json" in capsys.readouterr().out
    m = _manifest(shards_copy)
    tampered, cut = shards_copy / m["shards"]["dev"][0]["name"], shards_copy / m["shards"]["kb"][0]["name"]
    data = bytearray(tampered.read_bytes())
    data[700] ^= 0xFF  # same size, one byte different
    tampered.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:1024])
    (shards_copy / m["shards"]["test"][0]["name"]).unlink()
    assert verify_main([str(shards_copy), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "3 file(s) differ" in err
    assert f"{m['shards']['dev'][0]['name']}: sha256" in err
    assert f"{m['shards']['kb'][0]['name']}: 1024 bytes, the manifest says" in err
    assert f"{m['shards']['test'][0]['name']}: missing" in err
    assert verify_main([str(shards_copy), "--quiet", "--groups", "train"]) == 0


def test_evaluation_verifies_its_split_and_the_kb_before_ranking(shards_copy, tiny_export, tmp_path):
    from eval.evaluate import main as evaluate_main

    m = _manifest(shards_copy)
    dev = shards_copy / m["shards"]["dev"][0]["name"]
    data = bytearray(dev.read_bytes())
    data[700] ^= 0xFF
    dev.write_bytes(bytes(data))
    args = ["--checkpoint", str(tiny_export), "--split", "dev", "--out", str(tmp_path / "res"), "--set",
            f"data.shards={shards_copy}"]
    with pytest.raises(SystemExit, match=rf"(?s){m['shards']['dev'][0]['name']}: sha256.*eval.verify_checksums=false"):
        evaluate_main(args)
    assert not (tmp_path / "res" / "results-dev.json").exists()
    evaluate_main(args + ["--split", "test"])  # the test split and the KB are intact
    assert (tmp_path / "res" / "results-test.json").is_file()


def test_trainer_refuses_empty_splits_and_bad_shards_before_training(shards_copy):
    from model.config import Config
    from train.build import check_data
    from train.checkpoint_manager import RunSetupError

    cfg = Config()
    cfg.data.shards = str(shards_copy)
    check_data(cfg, ShardFolder.open(cfg.data.shards))  # intact, checksums not asked for
    first = shards_copy / _manifest(shards_copy)["shards"]["train"][0]["name"]
    first.write_bytes(first.read_bytes()[:-512])
    check_data(cfg, ShardFolder.open(cfg.data.shards))
    cfg.data.verify_checksums = True
    with pytest.raises(RunSetupError, match=rf"{first.parent.name}/{first.name}: \d+ bytes, the manifest says"):
        check_data(cfg, ShardFolder.open(cfg.data.shards))
    manifest = _manifest(shards_copy)
    manifest["counts"]["dev"] = 0
    (shards_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunSetupError, match="the dev split of .* is empty"):
        check_data(cfg, ShardFolder.open(cfg.data.shards))
    del manifest["counts"]["train"]
    (shards_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunSetupError, match=r"the train split of .* is missing"):
        check_data(cfg, ShardFolder.open(cfg.data.shards))


@pytest.fixture(scope="module")
def other_kb_shards(tiny_shards, tmp_path_factory) -> Path:
    """The same raw dataset converted with another shard size: the same tokenizer, a KB with other shard digests."""
    out = tmp_path_factory.mktemp("other") / "shards"
    convert("synthetic", tiny_shards.parent / "raw", out, ConvertSettings(image_size=32, shard_size=50, workers=1))
    return out


def test_export_records_its_tokenizer_and_kb(tiny_export, tiny_shards):
    from data_shards.identity import IDENTITY_FILE, kb_identity

    ident = json.loads((tiny_export / IDENTITY_FILE).read_text())
    assert ident["tokenizer"]["vocab_size"] > 0 and len(ident["tokenizer"]["vocab_sha256"]) == 64
    assert ident["kb"] == kb_identity(ShardFolder(tiny_shards)) and ident["kb"]["entities"] == 200


def test_another_tokenizer_is_an_error_that_no_flag_overrides(shards_copy, tiny_export, tmp_path):
    from data_shards.identity import DataMismatch
    from eval.evaluate import main as evaluate_main
    from eval.link import Linker

    tok_file = shards_copy / "tokenizer" / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    tok["model"]["vocab"]["zzzextra"] = max(tok["model"]["vocab"].values()) + 1
    tok_file.write_text(json.dumps(tok))
    base = ["--checkpoint", str(tiny_export), "--split", "dev", "--out", str(tmp_path), "--set", f"data.shards={shards_copy}"]
    for extra in ([], ["--allow-other-kb"]):
        with pytest.raises(SystemExit, match=r"tokenizer .* is not the one .* \(vocab_sha256 .*; vocab_size (\d+) vs (?!\1)\d+"):
            evaluate_main(base + extra)
    with pytest.raises(DataMismatch, match="vocab_size"):
        Linker(tiny_export, shards_copy, "cpu", allow_other_kb=True)
    assert not (tmp_path / "results-dev.json").exists()


def test_another_kb_is_an_error_unless_explicitly_allowed(other_kb_shards, tiny_export, tmp_path):
    from data_shards.identity import DataMismatch
    from eval.evaluate import main as evaluate_main
    from eval.link import Linker

    base = ["--checkpoint", str(tiny_export), "--split", "dev", "--out", str(tmp_path), "--set",
            f"data.shards={other_kb_shards}"]
    with pytest.raises(SystemExit, match=r"holds another KB .* 'synthetic' with 200 entities .*--allow-other-kb"):
        evaluate_main(base)
    assert not (tmp_path / "results-dev.json").exists()
    with pytest.raises(DataMismatch, match="another KB"):
        Linker(tiny_export, other_kb_shards, "cpu")
    evaluate_main(base + ["--allow-other-kb"])
    assert json.loads((tmp_path / "results-dev.json").read_text())["metrics"]["kb_size"] == 200


def _jordan_query():
    from data_shards.dme.backends import Query
    from data_shards.dme.candidates import CandidateTable

    table = CandidateTable.from_rows([{"qid": "Q810", "label": "Jordan", "description": "country in Western Asia"},
                                      {"qid": "Q41421", "label": "Jordan", "description": "American basketball player"}])
    return Query("Jordan", "Jordan dunks.", tuple(table.lookup("Jordan")))


def test_llm_deadline_bounds_a_server_trickling_its_reply(hostile_llm):
    from data_shards.dme.backends import LLMSelector
    from data_shards.dme.config import LLMSettings

    server = hostile_llm(lambda n: "trickle", trickle_s=0.2, trickle_bytes=40)  # 8 s, a byte well within any socket timeout
    sel = LLMSelector(LLMSettings(base_url=server.base_url, model="fake", timeout_s=1.0, retries=0))
    start = time.perf_counter()
    choice = sel._ask(_jordan_query())
    elapsed = time.perf_counter() - start
    sel.close()
    assert choice.index is None and choice.reason == "timeout" and not choice.cacheable
    assert elapsed < 2.5


@pytest.mark.parametrize("kind", ["huge", "huge-unannounced"])
def test_llm_reply_size_is_capped(hostile_llm, kind):
    from data_shards.dme.backends import LLMSelector
    from data_shards.dme.config import LLMSettings, load_dme_config

    assert load_dme_config().llm.max_reply_bytes == 1 << 20
    server = hostile_llm(lambda n: kind)
    sel = LLMSelector(LLMSettings(base_url=server.base_url, model="fake", retries=2, max_reply_bytes=64 << 10))
    choice = sel._ask(_jordan_query())
    sel.close()
    assert choice.index is None and choice.reason == "reply_too_large" and "65536" in choice.raw
    assert server.count == 1  # not retried: the same question gets the same reply


def test_dme_exits_non_zero_when_every_query_fell_back(hostile_llm, tiny_shards, tmp_path, capsys):
    from data_shards.dme.run import main as dme_main

    server = hostile_llm(lambda n: "vague")
    raw = tiny_shards.parent / "raw"
    rc = dme_main(["--dataset", "synthetic", "--root", str(raw), "--backend", "llm", "--out", str(tmp_path / "dme"),
                   "--splits", "dev", "--no-cache", "--quiet", "--set", f"llm.base_url={server.base_url}", "llm.model=fake"])
    err = capsys.readouterr().err
    assert rc == 3 and server.count > 0
    assert f"every one of the {server.count} queries fell back (unparsable {server.count})" in err


def test_a_symlinked_output_folder_is_rebuilt_where_it_points(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    (tmp_path / "big_disk").mkdir()
    os.symlink(tmp_path / "big_disk" / "shards", tmp_path / "shards", target_is_directory=True)
    convert("wikimel", raw, tmp_path / "shards", SMALL)
    convert("wikimel", raw, tmp_path / "shards", SMALL)
    assert (tmp_path / "shards").is_symlink() and (tmp_path / "big_disk" / "shards" / "manifest.json").is_file()
    _assert_consistent(tmp_path / "shards")
    _no_leftovers(tmp_path)
