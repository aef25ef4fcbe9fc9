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
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data_shards import reader
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
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            writer = wds.TarWriter(fh, encoder=False, mtime=0)  # mtime=0: byte-identical re-runs
            for item in items:
                if group == "kb":
                    sample, reason, used = _entity_sample(item, size, quality, folder, source)
                else:
                    sample, reason, used = _mention_sample(*item, size, quality, folder, source)
                stats.add(reason, used)
                writer.write(sample)
            writer.close()
        data = tmp.read_bytes()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"group": group, "path": str(path), "samples": len(items), "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "stats": asdict(stats)}


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


def _check_kb_ids(entities: Iterable[Entity], qid2id: dict[str, int], kb_file: Path) -> Iterator[Entity]:
    """Pass the entities through, checking that QIDs are unique and that qid2id maps each to its row."""
    row_of: dict[str, int] = {}
    n = 0
    for ent in entities:
        n += 1
        if ent.qid in row_of:
            raise DatasetFormatError(f"{kb_file}: QID {ent.qid!r} appears twice, at entity ids {row_of[ent.qid]} and {ent.id}: "
                                     "every KB entity needs its own QID")
        row_of[ent.qid] = ent.id
        mapped = qid2id.get(ent.qid)
        if isinstance(mapped, str) and mapped.isdigit():
            mapped = int(mapped)
        if mapped is None:
            raise DatasetFormatError(f"{kb_file}: entity id {ent.id} has QID {ent.qid!r}, which qid2id.json does not map")
        if mapped != ent.id:
            raise DatasetFormatError(f"qid2id.json maps {ent.qid!r} to row {mapped!r}, but {kb_file.name} has it at entity id "
                                     f"{ent.id}: the two files disagree (mentions would get the wrong gold entity)")
        yield ent
    if n != len(qid2id):
        extra = sorted(set(qid2id) - set(row_of))[:5]
        raise DatasetFormatError(f"qid2id.json maps {len(qid2id)} QIDs but {kb_file.name} has {n} entities "
                                 f"(QIDs without an entity, e.g. {extra})")


def _checked_kb(root: Path, qid2id: dict[str, int], threshold: float) -> Iterable[Entity]:
    """The KB in id order (streamed when the file is sorted), after the cheap image pre-check and
    the QID consistency check (both in one pass over the file)."""
    kb_file, folder = reader.kb_path(root), Path(root) / "kb_image"
    try:
        checked = _check_kb_ids(reader.iter_kb(root), qid2id, kb_file)
        _precheck((e.image_paths for e in checked), "KB (kb_entity.json)", threshold, folder)
        return reader.iter_kb(root)
    except KBNotSorted:
        sorted_kb = reader.read_kb(root)
        _precheck((e.image_paths for e in _check_kb_ids(sorted_kb, qid2id, kb_file)), "KB (kb_entity.json)", threshold,
                  folder)
        return sorted_kb


def _jobs(group: str, items: Iterable, out: Path, s: ConvertSettings, folder: Path, source: str) -> Iterator[tuple]:
    for i, chunk in enumerate(_chunks(items, s.shard_size)):
        yield group, out / group / f"{group}-{i:06d}.tar", chunk, s.image_size, s.jpeg_quality, folder, source


class _KBIndex:
    """Byte offsets of every entity's members, filled shard by shard (data_shards/store.py reads it)."""

    def __init__(self, n_entities: int) -> None:
        self.rows = np.zeros(n_entities, dtype=INDEX_DTYPE)
        self.next_id, self.shard_no = 0, 0

    def add_shard(self, rec: dict) -> None:
        offsets = _member_offsets(Path(rec["path"]))
        for _ in range(rec["samples"]):
            if self.next_id >= len(self.rows):
                raise DatasetFormatError(f"kb_entity.json has more entities than qid2id.json ({len(self.rows)})")
            key = f"{self.next_id:09d}"
            j_off, j_size = offsets[f"{key}.json"]
            p_off, p_size = offsets.get(f"{key}.jpg", (0, 0))
            self.rows[self.next_id] = (self.shard_no, j_off, j_size, p_off, p_size)
            self.next_id += 1
        self.shard_no += 1

    def save(self, kb_dir: Path) -> str:
        """Write kb/index.npy; returns its sha256."""
        if self.next_id != len(self.rows):
            raise DatasetFormatError(f"kb_entity.json has {self.next_id} entities but qid2id.json maps {len(self.rows)} QIDs")
        tmp = kb_dir / "index.npy.tmp.npy"
        np.save(tmp, self.rows)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, kb_dir / "index.npy")
        return digest


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
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(out)
    build = _sibling(out, "building")
    shutil.rmtree(build, ignore_errors=True)
    try:
        manifest = _convert_into(dataset, root, build, s)
        _swap_in(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return manifest


def _convert_into(dataset: str | reader.DatasetLayout, root: Path, out: Path, s: ConvertSettings) -> dict:
    lay = reader.layout(dataset)
    qid2id = reader.read_qid2id(root)
    # Read every split first: format errors surface before any image work.
    split_root = Path(s.desc_dir) if s.desc_dir else root
    splits = {sp: reader.read_split(split_root, lay, sp, qid2id, s.skip_unknown_answers) for sp in s.splits}
    for sp, r in splits.items():
        if not r.mentions:
            raise DatasetFormatError(f"the {sp} split ({r.path}) has no mention to link ({r.skipped_nil} nil and "
                                     f"{r.skipped_unknown} unknown answers skipped): nothing to train or evaluate on")
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
    for group in ["kb", *splits]:
        (out / group).mkdir(parents=True, exist_ok=True)
    jobs = [_jobs("kb", entities, out, s, root / "kb_image", "kb_entity.json")]
    jobs += [_jobs(sp, enumerate(r.mentions), out, s, image_dir, r.path.name) for sp, r in splits.items()]
    total = -(-len(qid2id) // s.shard_size) + sum(-(-len(r.mentions) // s.shard_size) for r in splits.values())
    shards: dict[str, list[dict]] = {g: [] for g in what}
    stats = {g: ImageStats() for g in what}
    kb_index = _KBIndex(len(qid2id))
    for rec in _run(itertools.chain(*jobs), s.workers, total):
        group = rec["group"]
        stats[group].merge(ImageStats(**rec["stats"]))
        shards[group].append(_shard_entry(rec, out))
        if group == "kb":
            kb_index.add_shard(rec)
    index_sha256 = kb_index.save(out / "kb")
    for group, st in stats.items():
        st.check(what[group], s.max_missing)
    manifest: dict = {
        "format_version": FORMAT_VERSION,
        "dataset": lay.name,
        "source": {"root": str(root.resolve()), "kb": "kb_entity.json", "qid2id": "qid2id.json",
                   "split_files": lay.split_files[0] if len(lay.split_files) == 1 else list(lay.split_files),
                   "splits": {sp: r.path.name for sp, r in splits.items()},
                   "mention_images": image_dir.name, "kb_images": "kb_image",
                   "desc_from": str(Path(s.desc_dir).resolve()) if s.desc_dir else None},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()
                     if k not in ("workers", "desc_dir")},
        "counts": {"entities": len(qid2id)} | {sp: len(r.mentions) for sp, r in splits.items()},
        "skipped": {sp: {"nil": r.skipped_nil, "unknown_answer": r.skipped_unknown, "unknown_examples": r.unknown_examples}
                    for sp, r in splits.items()},
        "images": {g: asdict(st) for g, st in stats.items()},
        "shards": shards,
        "entity_index": "kb/index.npy",
        "entity_index_sha256": index_sha256,
    }
    if (root / "tokenizer").is_dir():  # a dataset that ships its own tokenizer (the synthetic benchmark)
        shutil.copytree(root / "tokenizer", out / "tokenizer")
        manifest["tokenizer"] = "tokenizer"
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp, out / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert a MIMIC-format MEL dataset into webdataset shards.")
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
    a = p.parse_args(argv)
    s = ConvertSettings(a.image_size, a.shard_size, a.jpeg_quality, a.workers, a.max_missing, a.skip_unknown_answers,
                        tuple(a.splits), str(a.desc_from) if a.desc_from else None)
    try:
        lay = reader.resolve_layout(a.dataset, a.root, a.split_files, a.dataset_name)
        m = convert(lay, a.root, a.out, s)
    except (TooManyMissingImages, DatasetFormatError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    counts = ", ".join(f"{k} {v}" for k, v in m["counts"].items())
    print(f"wrote {a.out}/manifest.json: dataset {m['dataset']} ({m['source']['split_files']}), {counts}")
    for group, st in m["images"].items():
        print(f"  images {group}: {st['present']} present, {st['none']} none listed, {st['missing']} missing, "
              f"{st['unreadable']} unreadable, {st.get('refused', 0)} refused")


if __name__ == "__main__":
    main()
