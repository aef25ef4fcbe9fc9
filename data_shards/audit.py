"""Audit a MIMIC-format dataset for leaks between its splits and its KB, and optionally write a de-leaked copy.

    python -m data_shards.audit --root DIR [--dataset auto | --split-files 'NAME_{split}.json'] [--report PATH]
                                [--hash-threshold 4] [--write-clean OUT [--clean-desc]] [--skip-unknown-answers]

The dataset is read through the converter's reader and checks (``reader.read_dataset``): a dataset the
converter refuses is refused here with the same message. Nil mentions are counted, never checked;
answers missing from qid2id are refused, or with ``--skip-unknown-answers`` counted, as the converter does.

Checks:
* duplicate mentions across splits: a dev/test mention whose (sentence, mention, answer) equals a train
  mention's (test: or a dev mention's) exactly, or after normalisation (casefold, accents stripped,
  punctuation removed, spaces collapsed: ``near``);
* mention images identical (same file bytes) or near-identical (256-bit pHash within the Hamming threshold)
  to one of the gold entity's KB images; the same comparison against a random other entity's images is
  reported as a control (how often the threshold matches unrelated images);
* mention descriptions that are the gold entity's KB description verbatim (after normalisation);
* the share of dev/test mentions (and of distinct golds) whose gold never occurs in train; nil counts.

Clean policy (``--write-clean OUT``): dev/test mentions that duplicate a train mention (test: also a dev
mention), or whose image is identical or near-identical to one of its gold's KB images, are dropped; train
is kept whole; nil records are kept; with ``--clean-desc`` a description copied from the gold's KB
description is emptied instead of kept. OUT gets the split files as ``<name>-clean_{split}.json`` (so the
converter names the dataset ``<name>-clean`` and the leaderboard never shows published numbers beside
it), copies of the other top-level files, symbolic links to the image folders (``--copy-images`` copies
them) and ``audit_report.json`` with the list of dropped mentions. OUT must be new, empty, or a clean copy
this command wrote before (marked by ``reader.OWNER_FILE``; its contents are then replaced).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from core.atomic import write_text_atomic
from core.cli import disk_full_line
from core.hashing import file_sha256
from data_shards import reader
from data_shards.dme.candidates import normalise
from data_shards.reader import SPLITS, DatasetLayout

COMMAND = "data_shards.audit"  # marks the clean copies it writes (reader.claim_output_folder)
REPORT = "audit_report.json"  # in the dataset folder (the default --report) and in a clean copy
HASH_BITS = 256
# Of 256 bits. On the synthetic demo, a resized and re-encoded copy of a KB image moves the hash by 0-20 bits
# (99% <= 18), while a separate noisy render of the same object sits >= 22 bits from the gold's images and
# unrelated images ~128 bits away; real photos re-encoded or resized move it much less.
DEFAULT_THRESHOLD = 16
EXAMPLES = 5


@dataclass
class Record:
    split: str
    index: int  # position in the split file
    id: str
    sentence: str
    mention: str
    answer: str
    gold_id: int  # the answer's KB row
    image: Path | None
    desc: str

    def key(self, near: bool) -> tuple[str, str, str]:
        if near:
            return normalise(self.sentence), normalise(self.mention), self.answer
        return self.sentence, self.mention, self.answer


_SIDE, _LOW = 64, 16  # the image is shrunk to 64x64 grey; the 16x16 lowest DCT frequencies give 256 bits
_K = np.arange(_SIDE)
_DCT = np.cos(np.pi * (2 * _K[None, :] + 1) * _K[:, None] / (2 * _SIDE))[:_LOW]  # DCT-II rows, low frequencies only


def phash(path: Path) -> int | None:
    """256-bit perceptual hash: 64x64 grey (bilinear), 2-D DCT, the 16x16 lowest frequencies, one bit per
    coefficient above their median (the DC term left out of the median). Robust to re-encoding and
    resizing; None when the file is missing or unreadable."""
    try:
        with Image.open(path) as img:
            small = img.convert("L").resize((_SIDE, _SIDE), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    coeffs = (_DCT @ np.asarray(small, dtype=np.float64) @ _DCT.T).ravel()
    bits = coeffs > np.median(coeffs[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


class _ImageHashes:
    """File digest and perceptual hash of each image path, computed once."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[str, int] | None] = {}

    def get(self, path: Path) -> tuple[str, int] | None:
        if path not in self._cache:
            h = phash(path) if path.is_file() else None
            self._cache[path] = None if h is None else (file_sha256(path), h)
        return self._cache[path]


def read_records(data: reader.Dataset) -> tuple[dict[str, list[Record]], dict]:
    """Every mention to link of every split of ``data`` (read by ``reader.read_dataset``), and per-split counts."""
    out: dict[str, list[Record]] = {}
    counts: dict[str, dict] = {}
    for split, r in data.splits.items():
        recs = [Record(split, m.record, m.id, m.sentence, m.mention, m.answer, m.gold_id, m.image_path, m.desc)
                for m in r.mentions]
        out[split] = recs
        counts[split] = {"file": r.path.name, "records": len(recs) + r.skipped_nil + r.skipped_unknown, "checked": len(recs),
                         "nil": r.skipped_nil, "unknown_answer": r.skipped_unknown,
                         "with_image": sum(rec.image is not None for rec in recs)}
    return out, counts


def _duplicates(splits: dict[str, list[Record]]) -> tuple[dict, dict[tuple[str, int], list[str]]]:
    """Cross-split duplicates of dev/test mentions; returns the report part and the leaking records."""
    report: dict = {}
    leaks: dict[tuple[str, int], list[str]] = {}
    for later, earlier in (("dev", "train"), ("test", "train"), ("test", "dev")):
        exact_keys = {r.key(False): r.id for r in splits[earlier]}
        near_keys = {r.key(True): r.id for r in splits[earlier]}
        exact = near = 0
        examples = []
        for r in splits[later]:
            if r.key(False) in exact_keys:
                exact += 1
                other, kind = exact_keys[r.key(False)], "exact"
            elif r.key(True) in near_keys:
                near += 1
                other, kind = near_keys[r.key(True)], "near"
            else:
                continue
            leaks.setdefault((r.split, r.index), []).append(f"{kind} duplicate of {earlier} {other}")
            if len(examples) < EXAMPLES:
                examples.append(f"{later} {r.id} = {earlier} {other} ({kind})")
        report[f"{later}~{earlier}"] = {"exact": exact, "near": near, "share": (exact + near) / max(1, len(splits[later])),
                                        "examples": examples}
    within = {sp: sum(n - 1 for n in Counter(r.key(True) for r in recs).values() if n > 1) for sp, recs in splits.items()}
    report["within_split"] = within
    return report, leaks


def _image_leaks(splits: dict[str, list[Record]], kb: list[reader.Entity], threshold: int, seed: int, progress: bool
                 ) -> tuple[dict, dict[tuple[str, int], list[str]]]:
    hashes = _ImageHashes()
    rng = np.random.default_rng(seed)
    with_images = np.array([i for i, e in enumerate(kb) if e.image_paths], dtype=np.int64)
    leaks: dict[tuple[str, int], list[str]] = {}
    report: dict = {"method": f"pHash {HASH_BITS}-bit (DCT of 64x64 grey, 16x16 low frequencies), Hamming distance",
                    "threshold": threshold, "splits": {}}
    total = sum(r.image is not None for recs in splits.values() for r in recs)
    bar = tqdm(total=total, desc="image hashes", unit="img", disable=not progress or None)
    for split, recs in splits.items():
        checked = missing = identical = near = control = 0
        examples: list[str] = []
        for r in recs:
            if r.image is None:
                continue
            bar.update()
            mine = hashes.get(r.image)
            if mine is None:
                missing += 1
                continue
            gold = kb[r.gold_id]
            checked += 1
            best, how = None, ""
            for p in gold.image_paths:
                theirs = hashes.get(p)
                if theirs is None:
                    continue
                if theirs[0] == mine[0]:
                    best, how = (0, p), "identical"
                    break
                d = hamming(theirs[1], mine[1])
                if d <= threshold and (best is None or d < best[0]):
                    best, how = (d, p), "near"
            if best is not None:
                identical += how == "identical"
                near += how == "near"
                leaks.setdefault((split, r.index), []).append(f"image {how} to gold KB image {best[1].name} (distance {best[0]})")
                if len(examples) < EXAMPLES:
                    examples.append(f"{split} {r.id}: {r.image.name} {how} to {best[1].name} (distance {best[0]})")
            # Control: one random other entity with images; how often does the threshold match it?
            if len(with_images) > 1:
                other = int(with_images[rng.integers(len(with_images))])
                if other == gold.id:
                    other = int(with_images[(np.searchsorted(with_images, other) + 1) % len(with_images)])
                for p in kb[other].image_paths:
                    theirs = hashes.get(p)
                    if theirs is not None and (theirs[0] == mine[0] or hamming(theirs[1], mine[1]) <= threshold):
                        control += 1
                        break
        report["splits"][split] = {"checked": checked, "missing_or_unreadable": missing, "identical": identical,
                                   "near": near, "share": (identical + near) / max(1, checked),
                                   "control_random_entity": control, "examples": examples}
    bar.close()
    return report, leaks


def _desc_copies(splits: dict[str, list[Record]], kb: list[reader.Entity]) -> tuple[dict, set]:
    report, copied = {}, set()
    kb_norm: dict[int, str] = {}
    for split, recs in splits.items():
        with_desc = n = 0
        examples = []
        for r in recs:
            if not r.desc.strip():
                continue
            with_desc += 1
            gid = r.gold_id
            if gid not in kb_norm:
                kb_norm[gid] = normalise(kb[gid].desc)
            if kb_norm[gid] and normalise(r.desc) == kb_norm[gid]:
                n += 1
                copied.add((split, r.index))
                if len(examples) < EXAMPLES:
                    examples.append(f"{split} {r.id}")
        report[split] = {"with_desc": with_desc, "copied_from_gold": n, "share": n / max(1, with_desc), "examples": examples}
    return report, copied


def _unseen(splits: dict[str, list[Record]]) -> dict:
    seen = {r.answer for r in splits["train"]}
    out = {}
    for split in ("dev", "test"):
        recs = splits[split]
        golds = {r.answer for r in recs}
        unseen_m = sum(r.answer not in seen for r in recs)
        out[split] = {"mentions": len(recs), "unseen_mentions": unseen_m, "share": unseen_m / max(1, len(recs)),
                      "distinct_golds": len(golds), "distinct_unseen": len(golds - seen),
                      "distinct_share": len(golds - seen) / max(1, len(golds))}
    return out


def audit(root: Path, lay: DatasetLayout, threshold: int = DEFAULT_THRESHOLD, seed: int = 0, progress: bool = True,
          skip_unknown_answers: bool = False) -> tuple[dict, dict[tuple[str, int], list[str]], set]:
    """The report, the leaking dev/test records {(split, file index): reasons} and the records whose
    description is copied from the gold's KB description."""
    root = Path(root)
    data = reader.read_dataset(root, lay, SPLITS, skip_unknown_answers)
    splits, counts = read_records(data)
    kb = data.entities
    dup, dup_leaks = _duplicates(splits)
    img, img_leaks = _image_leaks(splits, kb, threshold, seed, progress)
    desc, copied = _desc_copies(splits, kb)
    leaks: dict[tuple[str, int], list[str]] = {}
    for part in (dup_leaks, img_leaks):
        for key, reasons in part.items():
            if key[0] in ("dev", "test"):
                leaks.setdefault(key, []).extend(reasons)
    leaking = {sp: sum(k[0] == sp for k in leaks) for sp in ("dev", "test")}
    report = {
        "dataset": lay.name, "root": str(root.resolve()), "entities": len(kb), "splits": counts,
        "duplicates": dup, "images": img, "descriptions": desc, "unseen_golds": _unseen(splits),
        "leaking_mentions": {sp: {"count": n, "share": n / max(1, counts[sp]["checked"])} for sp, n in leaking.items()},
    }
    return report, leaks, copied


def summary(report: dict) -> str:
    """A readable summary of the report."""
    lines = [f"audit of {report['dataset']} ({report['root']}): {report['entities']} entities"]
    for sp, c in report["splits"].items():
        lines.append(f"  {sp:5s} {c['file']}: {c['records']} records, {c['nil']} nil, {c['unknown_answer']} unknown answer, "
                     f"{c['with_image']} with an image")
    lines.append("duplicate mentions (same sentence, mention and answer; near = after normalisation):")
    for pair, d in report["duplicates"].items():
        if pair != "within_split":
            lines.append(f"  {pair:11s} {d['exact']} exact + {d['near']} near ({d['share']:.1%})"
                         + (f"  e.g. {d['examples'][0]}" if d["examples"] else ""))
    within = report["duplicates"]["within_split"]
    lines.append("  within a split: " + ", ".join(f"{sp} {n}" for sp, n in within.items()))
    img = report["images"]
    lines.append(f"mention image vs the gold's KB images ({img['method']} <= {img['threshold']} of {HASH_BITS} bits):")
    for sp, d in img["splits"].items():
        lines.append(f"  {sp:5s} {d['identical']} identical + {d['near']} near of {d['checked']} checked ({d['share']:.1%}); "
                     f"control (a random other entity): {d['control_random_entity']}; "
                     f"{d['missing_or_unreadable']} missing/unreadable" + (f"  e.g. {d['examples'][0]}" if d["examples"] else ""))
    lines.append("mention description = the gold's KB description (verbatim after normalisation):")
    lines.append("  " + ", ".join(f"{sp} {d['copied_from_gold']}/{d['with_desc']} ({d['share']:.1%})"
                                  for sp, d in report["descriptions"].items()))
    lines.append("golds unseen in train:")
    for sp, d in report["unseen_golds"].items():
        lines.append(f"  {sp:5s} {d['unseen_mentions']}/{d['mentions']} mentions ({d['share']:.1%}), "
                     f"{d['distinct_unseen']}/{d['distinct_golds']} distinct golds ({d['distinct_share']:.1%})")
    lines.append("leaking dev/test mentions (duplicate or image leak): " + ", ".join(
        f"{sp} {d['count']} ({d['share']:.1%})" for sp, d in report["leaking_mentions"].items()))
    return "\n".join(lines)


def _empty_own_folder(out: Path) -> None:
    """Remove what an earlier clean copy wrote to ``out`` (links to image folders unlinked, never followed)."""
    for entry in out.iterdir():
        if entry.name == reader.OWNER_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_clean(root: Path, lay: DatasetLayout, out: Path, leaks: dict[tuple[str, int], list[str]], copied: set,
                report: dict, clean_desc: bool = False, copy_images: bool = False) -> dict:
    """Write the de-leaked copy (policy: module docstring); returns what was dropped and changed."""
    root, out = Path(root), Path(out)
    if reader.claim_output_folder(out, COMMAND):
        _empty_own_folder(out)
    name = f"{lay.name}-clean"
    split_names = {reader.split_path(root, lay, sp).name for sp in SPLITS}
    families = {f"{p}_{sp}.json" for p, found in reader.split_families(root).items() for sp in found}
    for entry in sorted(root.iterdir()):
        if entry.name in split_names or entry.name in families or entry.name == REPORT:
            continue
        if entry.resolve() == out.resolve():  # OUT inside the dataset folder: never copied into itself
            continue
        target = out / entry.name
        if entry.is_dir():
            if copy_images:
                shutil.copytree(entry, target)
            else:
                target.symlink_to(entry.resolve(), target_is_directory=True)
        else:
            shutil.copy2(entry, target)
    dropped: dict[str, list[dict]] = {}
    emptied = Counter()
    for sp in SPLITS:
        src = reader.split_path(root, lay, sp)
        kept, dropped[sp] = [], []
        for index, rec in reader.iter_json_array(src):
            if (sp, index) in leaks:
                dropped[sp].append({"index": index, "id": rec.get("id"), "reasons": leaks[(sp, index)]})
                continue
            if clean_desc and (sp, index) in copied:
                rec = dict(rec, desc="")
                emptied[sp] += 1
            kept.append(rec)
        write_text_atomic(out / f"{name}_{sp}.json", json.dumps(kept, ensure_ascii=False))
    clean = {"dataset": name, "split_files": f"{name}_{{split}}.json",
             "policy": "drop dev/test mentions that duplicate (exactly or after normalisation) a train mention (test: "
                       "also a dev mention) or whose image is identical or near-identical to one of the gold's KB images; "
                       "keep train and nil records" + ("; empty descriptions copied from the gold's KB description"
                                                       if clean_desc else ""),
             "dropped": {sp: len(v) for sp, v in dropped.items()}, "descriptions_emptied": dict(emptied),
             "dropped_mentions": dropped}
    (out / REPORT).write_text(json.dumps(report | {"clean": clean}, indent=1, ensure_ascii=False))
    return clean


REPORT_KEYS = ("dataset", "root", "entities", "splits", "duplicates", "images")  # what audit() reports, first


def is_report(path: Path) -> bool:
    """Whether ``path`` holds a report this command wrote (the JSON object of :func:`audit`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in REPORT_KEYS)


def check_report_path(report: Path, root: Path) -> None:
    """FileExistsError unless ``report`` may be written: a new file or an earlier report of this command, and
    inside the dataset folder only ROOT/audit_report.json (another name there may be read as part of the
    dataset, or be one of its files)."""
    inside = Path(root).resolve() in report.resolve().parents
    if inside and report.resolve() != (Path(root) / REPORT).resolve():
        raise FileExistsError(f"{report} lies in the dataset folder {root}: the audit writes its report there only as "
                              f"{REPORT}; choose that name or a file outside the dataset (nothing was written)")
    if report.is_dir():
        raise FileExistsError(f"{report} is a folder: --report names the report's JSON file (nothing was written)")
    if report.exists() and not is_report(report):
        raise FileExistsError(f"{report} exists and is not a report of {COMMAND}: choose a new file for --report "
                              "(nothing was written)")


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Audit a MIMIC-format dataset for leaks between splits and KB.")
    p.add_argument("--root", required=True, type=Path, help="dataset folder (kb_entity.json, qid2id.json, splits, images)")
    p.add_argument("--dataset", default="auto", help="a known dataset or auto (the one <prefix>_{train,dev,test}.json family)")
    p.add_argument("--split-files", default=None, metavar="PATTERN", help="split file names, e.g. 'MyArt_{split}.json'")
    p.add_argument("--dataset-name", default=None)
    p.add_argument("--report", type=Path, default=None,
                   help="report JSON (default: ROOT/audit_report.json): a new file or an earlier report")
    p.add_argument("--hash-threshold", type=int, default=DEFAULT_THRESHOLD,
                   help=f"largest pHash Hamming distance (of {HASH_BITS} bits) that counts as near-identical")
    p.add_argument("--seed", type=int, default=0, help="seed of the control comparison's random entities")
    p.add_argument("--write-clean", type=Path, default=None, metavar="OUT", help="write a de-leaked copy of the dataset here")
    p.add_argument("--clean-desc", action="store_true", help="in the clean copy, empty descriptions copied from the gold's")
    p.add_argument("--copy-images", action="store_true", help="copy the image folders instead of linking them")
    p.add_argument("--skip-unknown-answers", action="store_true",
                   help="count mentions whose answer qid2id.json lacks instead of refusing the dataset (as the converter)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(list(argv) if argv is not None else None)
    if not 0 <= a.hash_threshold < HASH_BITS:
        sys.exit(f"error: --hash-threshold must lie in 0..{HASH_BITS - 1}")
    try:
        lay = reader.resolve_layout(a.dataset, a.root, a.split_files, a.dataset_name)
        report_path = a.report or a.root / REPORT
        check_report_path(report_path, a.root)
        if a.write_clean:  # before the audit's minutes of image hashing
            reader.check_output_folder(a.write_clean, COMMAND)
        report, leaks, copied = audit(a.root, lay, a.hash_threshold, a.seed, progress=not a.quiet,
                                      skip_unknown_answers=a.skip_unknown_answers)
        if a.write_clean:
            clean = write_clean(a.root, lay, a.write_clean, leaks, copied, report, a.clean_desc, a.copy_images)
    except (reader.DatasetFormatError, FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:
        line = disk_full_line(err)
        if line is None:
            raise
        sys.exit(line)
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(summary(report))
    print(f"report: {report_path}")
    if a.write_clean:
        print(f"clean copy: {a.write_clean} (dataset {clean['dataset']}): dropped "
              + ", ".join(f"{sp} {n}" for sp, n in clean["dropped"].items())
              + (f"; descriptions emptied {dict(clean['descriptions_emptied'])}" if a.clean_desc else ""))


if __name__ == "__main__":
    main()
