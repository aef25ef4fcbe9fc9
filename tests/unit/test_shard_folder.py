"""data_shards/folder.py: one object per shards folder, its manifest read once."""

import json
import re
import shutil

import pytest

import data_shards.folder as folder_module
from core.hashing import file_sha256
from data_shards.folder import ShardFolder
from data_shards.identity import kb_identity
from data_shards.store import ShardError


@pytest.fixture
def shards(tiny_shards, tmp_path):
    """A copy of the tiny shards folder that a test may change."""
    return shutil.copytree(tiny_shards, tmp_path / "shards")


def test_sha256_is_the_manifest_file_digest_computed_once(tiny_shards, monkeypatch):
    calls = []
    real = folder_module.hashlib.sha256
    with monkeypatch.context() as m:
        m.setattr(folder_module.hashlib, "sha256", lambda data=b"": calls.append(len(data)) or real(data))
        folder = ShardFolder(tiny_shards)
        digests = [folder.sha256, folder.sha256]
    assert calls == [(tiny_shards / "manifest.json").stat().st_size]  # once, over the manifest's bytes
    assert digests[0] == digests[1] == file_sha256(tiny_shards / "manifest.json")
    assert folder.sha256 == kb_identity(folder)["manifest_sha256"]


def test_what_the_manifest_says(tiny_shards):
    folder = ShardFolder(tiny_shards)
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert folder.dataset == manifest["dataset"] == "synthetic"
    assert folder.counts == manifest["counts"] and folder.counts["entities"] == 200
    assert folder.groups == sorted(manifest["shards"]) and "kb" in folder.groups
    assert folder.entity_index == tiny_shards / manifest["entity_index"]
    kb = folder.shard_set("kb")
    assert kb.paths == [tiny_shards / e["name"] for e in manifest["shards"]["kb"]] and kb.total == 200
    assert len(folder.store()) == 200
    assert str(folder) == str(tiny_shards)


def test_a_folder_object_keeps_what_it_read_and_open_sees_a_changed_manifest(shards):
    first = ShardFolder.open(shards)
    assert ShardFolder.open(shards) is first  # unchanged manifest: the same object
    facts = first.mention_facts("test")
    assert first.mention_facts("test") is facts and len(facts) == first.counts["test"]  # scanned once
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["dataset"] = "reconverted"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert first.dataset == "synthetic" and first.shard_set("kb").total == 200  # read once, at construction
    second = ShardFolder.open(shards)
    assert second is not first and second.dataset == "reconverted"
    assert second.sha256 == file_sha256(shards / "manifest.json") != first.sha256
    assert ShardFolder.open(shards) is second


def test_missing_group_and_missing_folder_messages(tiny_shards, tmp_path):
    folder = ShardFolder(tiny_shards)
    with pytest.raises(KeyError, match=re.escape(f"{tiny_shards}: no 'nope' shards; the manifest has {folder.groups}")):
        folder.shard_set("nope")
    with pytest.raises(KeyError, match=re.escape("the manifest has no ['nope'] shards")):
        folder.expected_files(["nope"])
    missing = tmp_path / "never-converted"
    message = f"{missing / 'manifest.json'} not found: convert the dataset first (python -m data_shards.convert)"
    for make in (ShardFolder, ShardFolder.open):
        with pytest.raises(FileNotFoundError, match=re.escape(message)):
            make(missing)


def test_verify_pools_the_ranks_shares_of_the_check(shards):
    folder = ShardFolder(shards)
    assert folder.problems(progress=False) == []
    folder.verify(None, "unused", rank=0, world=1)
    dev = folder.expected_files(["dev"])
    for f in dev[:2]:  # two bad files: each rank of two checks one of them
        (shards / f.name).unlink()
    shares = [folder.problems(["dev"], progress=False, part=(r, 2)) for r in range(2)]
    assert all(len(s) == 1 for s in shares)
    with pytest.raises(ShardError, match=rf"(?s)2 file\(s\) differ from manifest.json.*{dev[0].name}: missing.*"
                                         rf"{dev[1].name}: missing.*\(set a flag\)$"):
        folder.verify(["dev"], "set a flag", rank=0, world=2, gather=lambda mine: [mine, shares[1]])
