"""Convert a dataset folder (MIMIC format) into webdataset shards plus a manifest.

    python -m data_shards.convert --dataset wikimel --root DIR --out data/wikimel [--image-size 224] [--desc-from DME_OUT]
    python -m data_shards.convert --dataset auto --root DIR --out OUT      # any one <prefix>_{train,dev,test}.json family
    python -m data_shards.convert --split-files 'MyArt_{split}.json' [--dataset-name myart] --root DIR --out OUT

Output (under --out):
  kb/kb-000000.tar ...        entities in id order: <key>.json (text fields) + <key>.jpg (resized)
  kb/index.npy                byte offsets of every entity's members (random access, data_shards.store)
  {train,dev,test}/*.tar      mentions in file order: <key>.json + <key>.jpg
  manifest.json               counts, shards with sha256, image statistics, settings, sources
  tokenizer/                  copied from the dataset folder when it ships one (synthetic benchmark)

Images are decoded, resized (shortest side to the CLIP input size, centre crop) and re-encoded
once here, so training never opens the original files. The whole output is built in a hidden
sibling folder and swapped in when complete (the manifest is written last): a failed or killed
conversion leaves --out as it was, never old manifest/index beside new shards. A missing or
unreadable image, or one refused (outside its image folder, symlinks followed, or not a regular
file), is recorded (has_image false + reason) and counted; above --max-missing of a split or of
the KB the conversion stops and names the fraction and examples. A duplicate QID, a qid2id.json
that disagrees with the KB, text that is not valid Unicode and an empty split are errors that
name the records. With --desc-from, the split files come
from that folder (the output of ``python -m data_shards.dme``, same file names, DME descriptions);
the KB, qid2id and images still come from --root.

Conversion in parts, on several machines (e.g. a SLURM array job, one index per task; every
machine sees the filesystem that holds --out):

    python -m data_shards.convert ARGS --num-jobs N --job-index I   # each I in 0..N-1, in any order, at once or not
    python -m data_shards.convert ARGS --num-jobs N --merge         # once, after all N: writes --out

Every job reads and checks the dataset's JSON and runs the image pre-checks as a one-job
conversion does, but decodes only its own shards' images: the conversion's shards (KB, train,
dev, test, in that order) are dealt round robin, job I taking every N-th from the I-th, so a
shard's name and bytes never depend on N. A job writes its shards and a record (entries with
sha256, image statistics, KB index rows, settings, sha256 of the JSON inputs) to its own folder in
.OUT.parts/ beside --out (data_shards/parts.py); a re-run replaces it; --out is not touched. The
merge, given the same ARGS (--workers aside), refuses missing parts (naming their indices), parts
made with other settings, --num-jobs or inputs, and shards that differ from their record; it
applies --max-missing to the whole KB and each whole split, then writes kb/index.npy, the
tokenizer copy and the manifest and swaps the output into --out like a one-job conversion: the
same files, byte for byte (the images themselves are not fingerprinted: leave them alone between
the jobs and the merge). It removes .OUT.parts/ when done.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import webdataset as wds
from tqdm import tqdm

from core.atomic import atomic_write, write_text_atomic
from core.hashing import file_sha256
from data_shards import parts, reader
from data_shards.images import confined, prepare_image
from data_shards.reader import SPLITS, DatasetFormatError, Entity, KBNotSorted, Mention

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("json_offset", "<i8"), ("json_size", "<i4"),
                        ("jpg_offset", "<i8"), ("jpg_size", "<i4")])


class TooManyMissingImages(RuntimeError):
    pass


@dataclass
class ConvertSettings:
    image_size: int = 224
    shard_size: int = 1000
    jpeg_quality: int = 90
    workers: int = max(1, (os.cpu_count() or 1))
    max_missing: float = 0.05
    skip_unknown_answers: bool = False
    splits: tuple[str, ...] = SPLITS
    desc_dir: str | None = None  # read the split files from here (DME output) instead of the dataset folder


@dataclass
class ImageStats:
    present: int = 0
    none: int = 0  # no image listed (not an error)
    missing: int = 0
    unreadable: int = 0
    refused: int = 0  # outside the image folder, or not a regular file (never opened)
    examples: list[str] = field(default_factory=list)

    @property
    def listed(self) -> int:
        return self.present + self.missing + self.unreadable + self.refused

    @property
    def bad_fraction(self) -> float:
        return (self.missing + self.unreadable + self.refused) / self.listed if self.listed else 0.0

    def add(self, reason: str, path: Path | None) -> None:
        if reason == "":
            self.present += 1
        elif reason == "none":
            self.none += 1
        else:
            if reason == "missing":
                self.missing += 1
            elif reason.startswith("refused"):
                self.refused += 1
            else:
                self.unreadable += 1
            if len(self.examples) < 5:
                self.examples.append(f"{path} ({reason})")

    def merge(self, other: ImageStats) -> None:
        self.present += other.present
        self.none += other.none
        self.missing += other.missing
        self.unreadable += other.unreadable
        self.refused += other.refused
        self.examples = (self.examples + other.examples)[:5]

    def check(self, what: str, threshold: float) -> None:
        if self.bad_fraction > threshold:
            raise TooManyMissingImages(
                f"{what}: {self.bad_fraction:.1%} of the listed images are missing, unreadable or refused "
                f"({self.missing} missing, {self.unreadable} unreadable, {self.refused} refused, of {self.listed}), "
                f"above the {threshold:.0%} threshold. Examples: {'; '.join(self.examples)}. Check the image folder "
                "(renamed or not extracted?) or raise --max-missing."
            )


def _precheck(paths: Iterable[list[Path]], what: str, threshold: float, folder: Path) -> None:
    """Cheap existence check before any decoding, so a renamed image folder fails in seconds."""
    stats = ImageStats()
    for candidates in paths:
        if not candidates:
            stats.add("none", None)
        elif any(confined(p, folder) and p.is_file() for p in candidates):
            stats.add("", None)
        elif not all(confined(p, folder) for p in candidates):
            stats.add(f"refused: outside {folder.name}/", candidates[0])
        else:
            stats.add("missing", candidates[0])
    stats.check(what, threshold)


def _json_bytes(meta: dict, source: str, record: str) -> bytes:
    try:
        return json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        field_name = next((k for k, v in meta.items() if isinstance(v, str) and not _encodable(v)), "?")
        bad = err.object[err.start:err.end]
        raise DatasetFormatError(f"{source}: {record}: field {field_name!r} holds text that is not valid Unicode "
                                 f"({err.reason}: {bad!r}, e.g. a lone surrogate); fix the record") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _entity_sample(ent: Entity, size: int, quality: int, folder: Path, source: str) -> tuple[dict, str, Path | None]:
    jpg, reason, used = None, "none", None
    for path in ent.image_paths:  # first readable image of the entity
        jpg, reason = prepare_image(path, size, quality, folder)
        used = path
        if jpg is not None:
            break
    meta = {"id": ent.id, "qid": ent.qid, "name": ent.name, "desc": ent.desc, "has_image": jpg is not None,
            "image_reason": reason, "n_images": len(ent.image_paths)}
    sample = {"__key__": f"{ent.id:09d}", "json": _json_bytes(meta, source, f"entity id {ent.id} ({ent.qid!r})")}
    if jpg is not None:
        sample["jpg"] = jpg
    return sample, reason, used


def _mention_sample(index: int, m: Mention, size: int, quality: int, folder: Path, source: str) -> tuple[dict, str, Path | None]:
    jpg, reason = prepare_image(m.image_path, size, quality, folder)
    meta = {"index": index, "id": m.id, "sentence": m.sentence, "mention": m.mention, "gold_name": m.gold_name,
            "desc": m.desc, "answer": m.answer, "gold_id": m.gold_id, "has_image": jpg is not None, "image_reason": reason}
    sample = {"__key__": f"{index:09d}", "json": _json_bytes(meta, source, f"mention id {m.id!r}")}
    if jpg is not None:
        sample["jpg"] = jpg
    return sample, reason, m.image_path


def _write_shard(job: tuple) -> dict:
    """Worker: prepare the images of one shard and write it atomically. Returns its record."""
    group, path, items, size, quality, folder, source = job
    stats = ImageStats()
    with atomic_write(path, "wb") as fh:
        writer = wds.TarWriter(fh, encoder=False, mtime=0)  # mtime=0: byte-identical re-runs
        try:
            for item in items:
                if group == "kb":
                    sample, reason, used = _entity_sample(item, size, quality, folder, source)
                else:
                    sample, reason, used = _mention_sample(*item, size, quality, folder, source)
                stats.add(reason, used)
                writer.write(sample)
        except BaseException:  # a full disk, a bad record: mark the tar stream closed now, or its finaliser
            with contextlib.suppress(OSError, ValueError):  # writes to the closed file later (a stray traceback)
                writer.close()
            raise
        writer.close()
    return {"group": group, "path": str(path), "samples": len(items), "sha256": file_sha256(path),
            "bytes": Path(path).stat().st_size, "stats": asdict(stats)}


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers()}


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _run(jobs: Iterable[tuple], workers: int, total: int) -> Iterator[dict]:
    """All shards of all groups through one pool, results in job order (the KB index needs it)."""
    bar = tqdm(total=total, desc="shards", unit="shard", disable=None)
    if workers <= 1:
        for job in jobs:
            yield _write_shard(job)
            bar.update()
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for rec in pool.imap(_write_shard, jobs):
                yield rec
                bar.update()
    bar.close()


def _shard_entry(rec: dict, out: Path) -> dict:
    return {"name": str(Path(rec["path"]).relative_to(out)), "samples": rec["samples"], "sha256": rec["sha256"],
            "bytes": rec["bytes"]}


def _checked_kb(root: Path, qid2id: dict[str, int], threshold: float) -> Iterable[Entity]:
    """The KB in id order (streamed when the file is sorted), after the cheap image pre-check and
    the QID consistency check (both in one pass over the file)."""
    kb_file, folder = reader.kb_path(root), Path(root) / "kb_image"
    try:
        checked = reader.check_kb_ids(reader.iter_kb(root), qid2id, kb_file)
        _precheck((e.image_paths for e in checked), "KB (kb_entity.json)", threshold, folder)
        return reader.iter_kb(root)
    except KBNotSorted:
        sorted_kb = reader.read_kb(root)
        _precheck((e.image_paths for e in reader.check_kb_ids(sorted_kb, qid2id, kb_file)), "KB (kb_entity.json)", threshold,
                  folder)
        return sorted_kb


def _shard_name(group: str, k: int) -> str:
    return f"{group}/{group}-{k:06d}.tar"


def _jobs(group: str, items: Iterable, out: Path, s: ConvertSettings, folder: Path, source: str) -> Iterator[tuple]:
    for i, chunk in enumerate(_chunks(items, s.shard_size)):
        yield group, out / _shard_name(group, i), chunk, s.image_size, s.jpeg_quality, folder, source


def _kb_rows(path: Path, first_id: int, samples: int) -> list[list[int]]:
    """[json offset, json size, jpg offset, jpg size] of each entity of one KB shard ((0, 0): no image)."""
    offsets = _member_offsets(path)
    keys = (f"{entity_id:09d}" for entity_id in range(first_id, first_id + samples))
    return [[*offsets[f"{key}.json"], *offsets.get(f"{key}.jpg", (0, 0))] for key in keys]


class _KBIndex:
    """Byte offsets of every entity's members, filled shard by shard (data_shards/store.py reads it)."""

    def __init__(self, n_entities: int) -> None:
        self.rows = np.zeros(n_entities, dtype=INDEX_DTYPE)
        self.next_id, self.shard_no = 0, 0

    def add_shard(self, rec: dict) -> None:
        self.add_rows(_kb_rows(Path(rec["path"]), self.next_id, rec["samples"]))

    def add_rows(self, rows: list[list[int]]) -> None:
        """The next KB shard's rows (``_kb_rows``); shards come in order."""
        if self.next_id + len(rows) > len(self.rows):
            raise DatasetFormatError(f"kb_entity.json has more entities than qid2id.json ({len(self.rows)})")
        for row in rows:
            self.rows[self.next_id] = (self.shard_no, *row)
            self.next_id += 1
        self.shard_no += 1

    def save(self, kb_dir: Path) -> str:
        """Write kb/index.npy; returns its sha256."""
        if self.next_id != len(self.rows):
            raise DatasetFormatError(f"kb_entity.json has {self.next_id} entities but qid2id.json maps {len(self.rows)} QIDs")
        with atomic_write(kb_dir / "index.npy", "wb") as fh:
            np.save(fh, self.rows)
        return file_sha256(kb_dir / "index.npy")


# What a shards folder holds; anything else in --out is someone else's and stops the conversion.
OUTPUT_ENTRIES = {"manifest.json", "tokenizer", "kb", *SPLITS}


def _check_out(root: Path, out: Path) -> None:
    r, o = root.resolve(), out.resolve()
    if o == r or r.is_relative_to(o):
        raise ValueError(f"--out {out} is the dataset folder or one above it: choose a folder of its own for the shards")
    if o.exists() and not o.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if o.is_dir():
        foreign = sorted(p.name for p in o.iterdir() if p.name not in OUTPUT_ENTRIES and ".tmp" not in p.name)
        if foreign:
            raise ValueError(f"--out {out} holds files that are not shards ({', '.join(foreign[:5])}): a conversion replaces "
                             "the whole folder, so choose an empty or new folder (or move them)")


def _sibling(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}")


def _remove_dead_siblings(out: Path) -> None:
    """Build/old folders left by a conversion that was killed (its process is gone)."""
    for path in out.parent.glob(f".{out.name}.*-*"):
        tag, _, pid = path.name.rpartition("-")
        if not tag.endswith((".building", ".old")) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (a concurrent conversion)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue


def _swap_in(build: Path, out: Path) -> None:
    """Replace ``out`` by ``build``; a complete folder is under ``out`` at every instant but the
    one between the two renames (the old one is renamed aside first and deleted last)."""
    if out.exists():
        old = _sibling(out, "old")
        out.rename(old)
        build.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        build.rename(out)


def convert(dataset: str | reader.DatasetLayout, root: Path, out: Path, settings: ConvertSettings | None = None) -> dict:
    """Convert ``root`` into shards under ``out``; returns the manifest (also written to out/manifest.json).
    ``dataset``: a known dataset's name or a layout (``reader.resolve_layout``: auto-detected or custom split files).

    Everything is built in a hidden sibling folder (``.NAME.building-PID``) and swapped in only when
    complete: a failed or killed conversion leaves ``out`` as it was."""
    s = settings or ConvertSettings()
    root, out = Path(root), Path(out).resolve()  # resolved: a symlinked --out is rebuilt where it points
    _check_out(root, out)
    return _build_and_swap(out, lambda build: _convert_into(dataset, root, build, s))


def _build_and_swap(out: Path, build_into: Callable[[Path], dict]) -> dict:
    """Run ``build_into`` on a fresh hidden sibling of ``out`` and swap the result in (never a half-built ``out``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(out)
    build = _sibling(out, "building")
    shutil.rmtree(build, ignore_errors=True)
    try:
        manifest = build_into(build)
        _swap_in(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return manifest


class _Shard(NamedTuple):
    group: str
    index: int  # within its group
    name: str  # relative to the output folder
    samples: int


@dataclass
class _Plan:
    """What a conversion writes, known from the JSON files alone (read and checked, images
    pre-checked, none decoded). A one-job conversion, each job of a conversion in parts and the
    merge all start from it, so they agree on every shard, count and message."""

    lay: reader.DatasetLayout
    root: Path
    qid2id: dict[str, int]
    splits: dict[str, reader.SplitRecords]
    image_dir: Path
    entities: Iterable[Entity]  # may be a one-pass stream: shard_jobs() once per plan
    what: dict[str, str]  # group (kb, then the splits) -> its name in messages

    def layout(self, s: ConvertSettings) -> list[_Shard]:
        """Every shard, in the order a one-job conversion writes them."""
        sizes = {"kb": len(self.qid2id)} | {sp: len(r.mentions) for sp, r in self.splits.items()}
        return [_Shard(g, k, _shard_name(g, k), min(s.shard_size, n - k * s.shard_size))
                for g, n in sizes.items() for k in range(-(-n // s.shard_size))]

    def shard_jobs(self, out: Path, s: ConvertSettings) -> Iterator[tuple]:
        """``_write_shard``'s jobs, in ``layout`` order, writing under ``out``."""
        jobs = [_jobs("kb", self.entities, out, s, self.root / "kb_image", "kb_entity.json")]
        jobs += [_jobs(sp, enumerate(r.mentions), out, s, self.image_dir, r.path.name) for sp, r in self.splits.items()]
        return itertools.chain(*jobs)

    def make_dirs(self, out: Path) -> None:
        for group in self.what:
            (out / group).mkdir(parents=True, exist_ok=True)

    def inputs(self) -> dict[str, Path]:
        """The JSON files the shards are made from (fingerprinted in each part); images are not."""
        files = {"kb_entity.json": reader.kb_path(self.root), "qid2id.json": self.root / "qid2id.json"}
        return files | {f"{sp} split ({r.path.name})": r.path for sp, r in self.splits.items()}

    def manifest_head(self, s: ConvertSettings) -> dict:
        """The manifest's fields that do not depend on the images."""
        splits, lay = self.splits, self.lay
        return {
            "format_version": FORMAT_VERSION,
            "dataset": lay.name,
            "source": {"root": str(self.root.resolve()), "kb": "kb_entity.json", "qid2id": "qid2id.json",
                       "split_files": lay.split_files[0] if len(lay.split_files) == 1 else list(lay.split_files),
                       "splits": {sp: r.path.name for sp, r in splits.items()},
                       "mention_images": self.image_dir.name, "kb_images": "kb_image",
                       "desc_from": str(Path(s.desc_dir).resolve()) if s.desc_dir else None},
            "settings": _settings_record(s),
            "counts": {"entities": len(self.qid2id)} | {sp: len(r.mentions) for sp, r in splits.items()},
            "skipped": {sp: {"nil": r.skipped_nil, "unknown_answer": r.skipped_unknown, "unknown_examples": r.unknown_examples}
                        for sp, r in splits.items()},
        }


def _settings_record(s: ConvertSettings) -> dict:
    """The settings that shape the output (not the worker count; the DME folder by its files' contents)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items() if k not in ("workers", "desc_dir")}


def _plan(dataset: str | reader.DatasetLayout, root: Path, s: ConvertSettings) -> _Plan:
    lay = reader.layout(dataset)
    qid2id = reader.read_qid2id(root)
    # Read every split first: format errors surface before any image work.
    split_root = Path(s.desc_dir) if s.desc_dir else root
    splits = reader.read_splits(split_root, lay, s.splits, qid2id, s.skip_unknown_answers)  # none empty, ids unique
    image_dir = reader.mention_image_dir(root, lay)
    if s.desc_dir:  # the mention images stay in the dataset folder
        for records in splits.values():
            for m in records.mentions:
                m.image_path = image_dir / m.image_path.name if m.image_path else None
    # Cheap existence checks of every group before any decoding (a renamed folder fails in seconds).
    entities = _checked_kb(root, qid2id, s.max_missing)
    what = {"kb": "KB (kb_entity.json)"} | {sp: f"{sp} split ({r.path.name})" for sp, r in splits.items()}
    for sp, records in splits.items():
        _precheck(([m.image_path] if m.image_path else [] for m in records.mentions), what[sp], s.max_missing, image_dir)
    return _Plan(lay, root, qid2id, splits, image_dir, entities, what)


def _convert_into(dataset: str | reader.DatasetLayout, root: Path, out: Path, s: ConvertSettings) -> dict:
    plan = _plan(dataset, root, s)
    plan.make_dirs(out)
    shards: dict[str, list[dict]] = {g: [] for g in plan.what}
    stats = {g: ImageStats() for g in plan.what}
    kb_index = _KBIndex(len(plan.qid2id))
    for rec in _run(plan.shard_jobs(out, s), s.workers, len(plan.layout(s))):
        group = rec["group"]
        stats[group].merge(ImageStats(**rec["stats"]))
        shards[group].append(_shard_entry(rec, out))
        if group == "kb":
            kb_index.add_shard(rec)
    return _finish(plan, out, s, shards, stats, kb_index)


def _check_images(plan: _Plan, stats: dict[str, ImageStats], s: ConvertSettings) -> None:
    for group, st in stats.items():
        st.check(plan.what[group], s.max_missing)


def _finish(plan: _Plan, out: Path, s: ConvertSettings, shards: dict[str, list[dict]], stats: dict[str, ImageStats],
            kb_index: _KBIndex) -> dict:
    """What a conversion writes once its shards are in ``out``: the KB index, the tokenizer copy, the manifest (last)."""
    index_sha256 = kb_index.save(out / "kb")
    _check_images(plan, stats, s)
    manifest = plan.manifest_head(s) | {"images": {g: asdict(st) for g, st in stats.items()}, "shards": shards,
                                        "entity_index": "kb/index.npy", "entity_index_sha256": index_sha256}
    root = plan.root
    if (root / "tokenizer").is_dir():  # a dataset that ships its own tokenizer (the synthetic benchmark)
        shutil.copytree(root / "tokenizer", out / "tokenizer")
        manifest["tokenizer"] = "tokenizer"
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


# ----------------------------------------------------------------------------------------------
# Conversion in parts: jobs write their shards to a staging folder, one merge writes --out.


def _part_identity(plan: _Plan, s: ConvertSettings, num_jobs: int) -> dict:
    """What every part and the merge must share (data_shards.parts.check_parts compares it)."""
    return {"num_jobs": num_jobs, "dataset": plan.lay.name, "settings": _settings_record(s),
            "inputs": parts.input_digests(plan.inputs())}


def convert_part(dataset: str | reader.DatasetLayout, root: Path, out: Path, settings: ConvertSettings | None = None, *,
                 num_jobs: int, job_index: int) -> dict:
    """Job ``job_index`` of a conversion in ``num_jobs`` parts: reads and checks the dataset as
    ``convert`` does, but decodes only the images of its own shards (every ``num_jobs``-th of the
    conversion's shards, from the ``job_index``-th) and writes them with its record to the staging
    folder beside ``out`` (``data_shards.parts``); ``out`` itself is not touched. A re-run of an
    index replaces that part. Returns the record; ``merge_parts`` writes ``out`` once all are done."""
    s = settings or ConvertSettings()
    parts.check_job_args(num_jobs, job_index)
    root, out = Path(root), Path(out).resolve()
    _check_out(root, out)
    plan = _plan(dataset, root, s)
    part = parts.part_dir(parts.staging_dir(out), job_index)
    build = parts.building_dir(part)
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        record = _part_into(plan, build, s, num_jobs, job_index)
        _swap_in(build, part)  # renames only: the merge sees the old part or the new one, never a mixture
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return record


def _part_into(plan: _Plan, build: Path, s: ConvertSettings, num_jobs: int, job_index: int) -> dict:
    plan.make_dirs(build)
    mine = [sh for seq, sh in enumerate(plan.layout(s)) if parts.owner(seq, num_jobs) == job_index]
    # The other shards' jobs are built too (lists of records: cheap) but never run: no image of theirs is opened.
    jobs = (job for seq, job in enumerate(plan.shard_jobs(build, s)) if parts.owner(seq, num_jobs) == job_index)
    entries = []
    for shard, rec in zip(mine, _run(jobs, s.workers, len(mine)), strict=True):
        entry = _shard_entry(rec, build) | {"stats": rec["stats"]}
        if shard.group == "kb":  # the KB index rows of this shard, so the merge need not read it
            entry["kb_rows"] = _kb_rows(Path(rec["path"]), shard.index * s.shard_size, rec["samples"])
        entries.append(entry)
    record = parts.new_record(_part_identity(plan, s, num_jobs), job_index, entries)
    parts.write_record(build, record)
    return record


def merge_parts(dataset: str | reader.DatasetLayout, root: Path, out: Path, settings: ConvertSettings | None = None, *,
                num_jobs: int) -> dict:
    """Merge the ``num_jobs`` parts of ``convert_part`` into ``out``: byte for byte what ``convert``
    writes with the same dataset and settings (``workers`` aside), swapped in the same way. Refuses
    (``parts.PartsError``) missing parts, parts made otherwise, and shards that differ from their
    part's record; the --max-missing check applies to the whole KB and splits, as in ``convert``.
    A failed merge leaves ``out`` and the parts as they were; a successful one removes the parts."""
    s = settings or ConvertSettings()
    parts.check_job_args(num_jobs)
    root, out = Path(root), Path(out).resolve()
    _check_out(root, out)
    plan = _plan(dataset, root, s)  # the jobs' reading and pre-checks: the same counts, names and errors
    staging = parts.staging_dir(out)
    found = parts.read_parts(staging)
    parts.check_parts(found, _part_identity(plan, s, num_jobs), staging)
    layout = plan.layout(s)
    entries = parts.ordered_entries(found, [(sh.name, sh.samples) for sh in layout], num_jobs, staging)
    stats = {g: ImageStats() for g in plan.what}
    for shard, entry in zip(layout, entries, strict=True):  # in shard order: the same examples as one job keeps
        stats[shard.group].merge(ImageStats(**entry["stats"]))
    _check_images(plan, stats, s)  # the whole KB and splits, before any shard is linked
    manifest = _build_and_swap(out, lambda build: _merge_into(plan, layout, entries, stats, build, s))
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _merge_into(plan: _Plan, layout: list[_Shard], entries: list[dict], stats: dict[str, ImageStats], out: Path,
                s: ConvertSettings) -> dict:
    plan.make_dirs(out)
    shards: dict[str, list[dict]] = {g: [] for g in plan.what}
    kb_index = _KBIndex(len(plan.qid2id))
    for shard, entry in zip(layout, entries, strict=True):
        digest = parts.place(entry, out / shard.name)
        shards[shard.group].append({"name": shard.name, "samples": entry["samples"], "sha256": digest, "bytes": entry["bytes"]})
        if shard.group == "kb":
            kb_index.add_rows(entry["kb_rows"])
    return _finish(plan, out, s, shards, stats, kb_index)


_PARTS_HELP = """conversion in parts (e.g. a SLURM array job; every machine sees --out's folder):
  python -m data_shards.convert ARGS --num-jobs N --job-index I   # each I in 0..N-1, any order, at once or not
  python -m data_shards.convert ARGS --num-jobs N --merge         # once all N are done: writes --out
The jobs and the merge take the same ARGS (--workers may differ). The parts go to .OUT.parts/ beside
--out; the merge checks them, writes --out exactly as a one-job conversion would, and removes them."""


def _disk_full(err: OSError) -> bool:
    if err.errno == errno.ENOSPC:
        return True
    # shutil.copytree (the tokenizer copy) collects its files' errors into one shutil.Error, errno unset
    return isinstance(err, shutil.Error) and os.strerror(errno.ENOSPC) in str(err)


def _os_error_line(err: OSError, out: Path) -> str:
    """A failed write or read of the conversion on one line; a full disk names --out and says it is full."""
    if _disk_full(err):
        return (f"the disk holding {out.resolve().parent} is full (no space left on device) while converting into {out}: "
                f"{out} was left as it was (no new manifest); free space or choose another --out, then run again")
    return f"{err}: {out} was left as it was (no new manifest)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert a MIMIC-format MEL dataset into webdataset shards.", epilog=_PARTS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="auto", choices=["auto", *sorted(reader.LAYOUTS)],
                   help="a known dataset, or auto: the one <prefix>_{train,dev,test}.json family in --root (default)")
    p.add_argument("--split-files", default=None, metavar="PATTERN",
                   help="split file names with a {split} placeholder, e.g. 'MyArt_{split}.json' (overrides --dataset)")
    p.add_argument("--dataset-name", default=None, help="dataset name for the manifest (default: the split files' prefix)")
    p.add_argument("--root", required=True, type=Path, help="dataset folder (kb_entity.json, qid2id.json, splits, images)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-size", type=int, default=224, help="CLIP input size (224 for ViT-B/32)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--max-missing", type=float, default=0.05, help="largest tolerated share of missing/unreadable images")
    p.add_argument("--skip-unknown-answers", action="store_true", help="skip and count mentions whose answer is not in qid2id")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--desc-from", type=Path, default=None,
                   help="read the split files from this folder (output of python -m data_shards.dme) instead of --root")
    p.add_argument("--num-jobs", type=int, default=None, metavar="N", help="convert in N parts, then merge (see below)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--job-index", type=int, default=None, metavar="I",
                      help="write part I of N (its shards only) to the staging folder; --out is not touched")
    step.add_argument("--merge", action="store_true", help="check the N parts and write --out from them")
    a = p.parse_args(argv)
    if (a.job_index is not None or a.merge) != (a.num_jobs is not None):
        p.error("--num-jobs N goes with --job-index I (one part) or --merge, and they with it")
    s = ConvertSettings(a.image_size, a.shard_size, a.jpeg_quality, a.workers, a.max_missing, a.skip_unknown_answers,
                        tuple(a.splits), str(a.desc_from) if a.desc_from else None)
    try:
        lay = reader.resolve_layout(a.dataset, a.root, a.split_files, a.dataset_name)
        if a.job_index is not None:
            rec = convert_part(lay, a.root, a.out, s, num_jobs=a.num_jobs, job_index=a.job_index)
        else:
            m = merge_parts(lay, a.root, a.out, s, num_jobs=a.num_jobs) if a.merge else convert(lay, a.root, a.out, s)
    except (TooManyMissingImages, DatasetFormatError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # the conversion was built aside and removed: --out is as it was
        sys.exit(f"error: {_os_error_line(err, a.out)}")
    if a.job_index is not None:
        part = parts.part_dir(parts.staging_dir(a.out.resolve()), a.job_index)
        print(f"wrote part {a.job_index} of {a.num_jobs} ({len(rec['shards'])} shards) to {part}; once all {a.num_jobs} "
              "are written, run the same command with --merge instead of --job-index")
        return
    counts = ", ".join(f"{k} {v}" for k, v in m["counts"].items())
    merged = f" (merged from {a.num_jobs} parts)" if a.merge else ""
    print(f"wrote {a.out}/manifest.json{merged}: dataset {m['dataset']} ({m['source']['split_files']}), {counts}")
    for group, st in m["images"].items():
        print(f"  images {group}: {st['present']} present, {st['none']} none listed, {st['missing']} missing, "
              f"{st['unreadable']} unreadable, {st.get('refused', 0)} refused")


if __name__ == "__main__":
    main()
