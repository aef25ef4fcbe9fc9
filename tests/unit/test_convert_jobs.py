"""Conversion in parts (``--num-jobs N --job-index I``, then ``--merge``): the merged output is the
one-job conversion byte for byte, each job decodes only its share of the images, and the merge
refuses parts that are missing, made otherwise or changed, leaving --out as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import data_shards.convert as convert_mod
from data_shards import parts, reader
from data_shards.convert import ConvertSettings, TooManyMissingImages, convert, convert_part, merge_parts
from data_shards.parts import PartsError
from data_shards.synthetic import generate, preset
from tests.support.convert_jobs import SETTINGS, _assert_same_conversion, _tree


def _run_jobs(raw: Path, out: Path, n: int, order: list[int], s: ConvertSettings = SETTINGS) -> list[dict]:
    return [convert_part("synthetic", raw, out, s, num_jobs=n, job_index=i) for i in order]


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.rglob("*") if ".tmp" in p.name or ".building-" in p.name or ".old-" in p.name]


def _count_images(monkeypatch) -> list[int]:
    """Counts the images the converter opens (prepare_image with a path; workers=1 runs in this process)."""
    calls = [0]
    real = convert_mod.prepare_image

    def counting(path, *args, **kwargs):
        calls[0] += path is not None
        return real(path, *args, **kwargs)

    monkeypatch.setattr(convert_mod, "prepare_image", counting)
    return calls


def test_three_jobs_in_any_order_and_a_merge_equal_a_one_job_conversion(raw, tmp_path, monkeypatch):
    calls = _count_images(monkeypatch)
    convert("synthetic", raw, tmp_path / "one", SETTINGS)
    total = calls[0]
    out, per_job = tmp_path / "out", {}
    for i in (2, 0, 1):
        calls[0] = 0
        (record,) = _run_jobs(raw, out, 3, [i])
        per_job[i] = (calls[0], len(record["shards"]))
    assert not out.exists()  # the jobs never touch --out
    staging = parts.staging_dir(out.resolve())
    assert sorted(p.name for p in staging.iterdir()) == ["job-000000", "job-000001", "job-000002"]
    # Each job decodes only its own shards' images, about a third: the 24 shards are dealt 8 per job, and the
    # images differ by the groups' short last shards and the mentions without an image (here 207, 207, 145 of 559).
    assert total == 559 and sum(n for n, _ in per_job.values()) == total
    assert all(shards == 8 and abs(n - total / 3) <= 2 * SETTINGS.shard_size for n, shards in per_job.values()), per_job
    manifest = merge_parts("synthetic", raw, out, SETTINGS, num_jobs=3)
    _assert_same_conversion(out, tmp_path / "one")
    assert manifest["counts"] == {"entities": 200, "train": 297, "dev": 59, "test": 59}
    assert not staging.exists() and not _leftovers(tmp_path)


def test_a_merge_with_a_part_missing_names_it_and_leaves_out_untouched(raw, one_job, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(one_job, out)  # an earlier complete conversion
    before = _tree(out)
    _run_jobs(raw, out, 3, [0, 2])
    with pytest.raises(PartsError, match=r"no part for job indices \[1\] of --num-jobs 3"):
        merge_parts("synthetic", raw, out, SETTINGS, num_jobs=3)
    assert _tree(out) == before and not _leftovers(tmp_path)
    assert (parts.staging_dir(out.resolve()) / "job-000002" / parts.RECORD).is_file()  # the parts are kept
    _run_jobs(raw, out, 3, [1])  # the missing job, later: the merge then succeeds
    merge_parts("synthetic", raw, out, SETTINGS, num_jobs=3)
    _assert_same_conversion(out, one_job)


def test_parts_made_with_other_settings_are_refused(raw, tmp_path):
    out = tmp_path / "out"
    _run_jobs(raw, out, 3, [0, 1])
    _run_jobs(raw, out, 3, [2], ConvertSettings(image_size=16, shard_size=29, workers=1))
    with pytest.raises(PartsError, match=r"job 2 \(job-000002\) was made with other settings \(image_size 16 vs 32"):
        merge_parts("synthetic", raw, out, SETTINGS, num_jobs=3)
    assert not out.exists()
    with pytest.raises(PartsError, match=r"job 0 \(job-000000\) was made with --num-jobs 3, the merge has --num-jobs 2"):
        merge_parts("synthetic", raw, out, SETTINGS, num_jobs=2)


def test_parts_made_from_other_inputs_or_changed_afterwards_are_refused(raw, one_job, tmp_path):
    data, out = tmp_path / "raw", tmp_path / "out"
    shutil.copytree(raw, data)
    _run_jobs(data, out, 2, [0, 1])
    # A shard changed after its job wrote it: the merge names the file and leaves --out as it was.
    shard = parts.staging_dir(out.resolve()) / "job-000001" / "kb" / "kb-000001.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(PartsError, match=r"job-000001/kb/kb-000001\.tar differs from job 1's record"):
        merge_parts("synthetic", data, out, SETTINGS, num_jobs=2)
    assert not out.exists() and not _leftovers(tmp_path)
    shard.write_bytes(good)
    # A split file edited between the jobs and the merge (same records, other bytes).
    test_file = data / "SyntheticMEL_test.json"
    test_file.write_text(json.dumps(json.loads(test_file.read_text()), indent=3))
    with pytest.raises(PartsError, match=r"other input files: test split \(SyntheticMEL_test\.json\) differ"):
        merge_parts("synthetic", data, out, SETTINGS, num_jobs=2)
    assert not out.exists()


def test_a_rerun_job_replaces_its_part(raw, one_job, tmp_path):
    out = tmp_path / "out"
    _run_jobs(raw, out, 3, [1], ConvertSettings(image_size=16, shard_size=29, workers=1))  # a wrong first attempt
    _run_jobs(raw, out, 3, [0, 2, 1, 1])  # ... retried (twice)
    staging = parts.staging_dir(out.resolve())
    assert sorted(p.name for p in staging.iterdir()) == ["job-000000", "job-000001", "job-000002"]
    record = json.loads((staging / "job-000001" / parts.RECORD).read_text())
    assert record["settings"]["image_size"] == 32 and record["job_index"] == 1
    merge_parts("synthetic", raw, out, SETTINGS, num_jobs=3)
    _assert_same_conversion(out, one_job)


def _spoil(paths: list[Path]) -> None:
    """Truncate each JPEG: it exists (the pre-check passes) but fails to decode. Not arbitrary bytes: Pillow's
    message for an unidentifiable file holds a memory address, which would make even two one-job runs differ."""
    for path in paths:
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])


def test_max_missing_applies_to_the_whole_split_at_the_merge(tmp_path):
    data = tmp_path / "raw"
    generate(data, preset("tiny"), workers=1, progress=False)
    qid2id = reader.read_qid2id(data)
    train = reader.read_split(data, reader.layout("synthetic"), "train", qid2id).mentions
    kb_shards = -(-len(qid2id) // SETTINGS.shard_size)  # the train shards follow the KB's in the deal

    def images_of(job: int) -> list[Path]:
        return [m.image_path for i, m in enumerate(train)
                if m.image_path and parts.owner(kb_shards + i // SETTINGS.shard_size, 3) == job]

    listed = sum(m.image_path is not None for m in train)
    # 10 bad images, all in job 0's train shards: job 0 alone is over 5%, the whole split is not.
    _spoil(images_of(0)[:10])
    out = tmp_path / "out"
    records = _run_jobs(data, out, 3, [0, 1, 2])
    own = [e["stats"] for e in records[0]["shards"] if e["name"].startswith("train/")]
    assert sum(s["unreadable"] for s in own) / sum(s["present"] + s["unreadable"] for s in own) > 0.05
    assert 10 / listed < 0.05
    manifest = merge_parts("synthetic", data, out, SETTINGS, num_jobs=3)
    assert manifest["images"]["train"]["unreadable"] == 10
    convert("synthetic", data, tmp_path / "one", SETTINGS)
    _assert_same_conversion(out, tmp_path / "one")
    # 4 more in jobs 1 and 2 (each still under 5% alone): the whole split is over, and the merge says what one job says.
    _spoil(images_of(1)[:2] + images_of(2)[:2])
    assert 14 / listed > 0.05
    with pytest.raises(TooManyMissingImages) as one:
        convert("synthetic", data, tmp_path / "one2", SETTINGS)
    _run_jobs(data, out, 3, [2, 1, 0])  # no job refuses its share alone
    before = _tree(out)
    with pytest.raises(TooManyMissingImages) as merged:
        merge_parts("synthetic", data, out, SETTINGS, num_jobs=3)
    assert str(merged.value) == str(one.value) and "train split (SyntheticMEL_train.json): 5.4%" in str(one.value)
    assert _tree(out) == before and not _leftovers(tmp_path)
