"""Conversion in parts: where the parts of ``python -m data_shards.convert --num-jobs N --job-index I``
live, what each one records, and the checks the merge (``--num-jobs N --merge``) makes before it
uses them. ``data_shards/convert.py`` drives both; this module knows nothing of images or shards'
contents.

Staging folder, beside --out (the same filesystem, so the merge hard-links the shards into place):
  .OUT.parts/job-000002/                        a complete part: its shards (kb/, train/, ...) and part.json
  .OUT.parts/.job-000002.building-HOST-PID/     a part being written; renamed to job-000002 when complete

A job writes only inside its own building folder (host and pid in the name: two attempts at one
index, even on two machines, never share it) and then swaps it in by renames, so jobs running at
once on machines sharing a filesystem never write the same file, and a re-run of an index (a
retried array task) replaces that index's part. The merge removes the staging folder when done.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.atomic import write_text_atomic
from core.hashing import file_sha256

RECORD = "part.json"
PART_FORMAT = 1


class PartsError(ValueError):
    """The parts cannot be merged (missing, made otherwise, or changed); the message says which and why."""


def staging_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.parts")


def part_dir(staging: Path, index: int) -> Path:
    return staging / f"job-{index:06d}"


def building_dir(part: Path) -> Path:
    return part.with_name(f".{part.name}.building-{socket.gethostname()}-{os.getpid()}")


def owner(seq: int, num_jobs: int) -> int:
    """The job that writes the seq-th shard of a conversion (KB, train, dev, test shards in one
    sequence, dealt round robin): every job gets the same number of shards to within one, and a
    shard's name and contents never depend on the number of jobs."""
    return seq % num_jobs


def check_job_args(num_jobs: int, job_index: int | None = None) -> None:
    if num_jobs < 1:
        raise ValueError(f"--num-jobs must be at least 1 (got {num_jobs})")
    if job_index is not None and not 0 <= job_index < num_jobs:
        raise ValueError(f"--job-index must be in 0..{num_jobs - 1} for --num-jobs {num_jobs} (got {job_index})")


def input_digests(files: dict[str, Path]) -> dict[str, str]:
    """sha256 of each input file by label: contents, not mtimes, so copies of a dataset on each
    node's local disk count as the same input."""
    return {label: file_sha256(path) for label, path in files.items()}


def write_record(folder: Path, record: dict) -> None:
    write_text_atomic(folder / RECORD, json.dumps(record, indent=1, ensure_ascii=False))


def read_parts(staging: Path) -> dict[int, dict | None]:
    """Complete parts by job index (None: a part folder whose record cannot be read)."""
    found: dict[int, dict | None] = {}
    for path in sorted(staging.glob("job-*")) if staging.is_dir() else []:
        index = path.name.removeprefix("job-")
        if not index.isdigit():
            continue
        try:
            found[int(index)] = json.loads((path / RECORD).read_text())
        except (OSError, ValueError):
            found[int(index)] = None
    return found


def _changed(part: Any, merge: dict) -> list[str]:
    part = part if isinstance(part, dict) else {}
    return [k for k in sorted(set(part) | set(merge)) if part.get(k) != merge.get(k)]


def _differences(part: Any, merge: dict) -> list[str]:
    part = part if isinstance(part, dict) else {}
    return [f"{k} {part.get(k)!r} vs {merge.get(k)!r}" for k in _changed(part, merge)]


def new_record(identity: dict, job_index: int, shards: list[dict]) -> dict:
    """A part's record: ``identity`` (what check_parts compares) and its shards' entries; host and
    pid only say where it was made (never compared)."""
    return {"format": PART_FORMAT, **identity, "job_index": job_index, "host": socket.gethostname(), "pid": os.getpid(),
            "shards": shards}


def check_parts(found: dict[int, dict | None], expect: dict, staging: Path) -> None:
    """Refuse unless ``found`` holds exactly parts 0..N-1, each made with the merge's num_jobs,
    dataset, settings and input files (``expect``: what the merge computed for itself)."""
    n = expect["num_jobs"]
    problems = []
    missing = [i for i in range(n) if i not in found]
    if missing:
        problems.append(f"no part for job indices {missing} of --num-jobs {n} (not run yet, still running, or failed): "
                        "run those jobs first")
    for i, rec in sorted(found.items()):
        name = f"job {i} ({part_dir(staging, i).name})"
        if rec is None or rec.get("format") != PART_FORMAT:
            problems.append(f"{name}: no readable {RECORD} of this version: re-run job {i}")
            continue
        if i >= n or rec.get("num_jobs") != n:
            problems.append(f"{name} was made with --num-jobs {rec.get('num_jobs')}, the merge has --num-jobs {n} (left from "
                            f"another run? then remove {part_dir(staging, i)})")
            continue
        if rec.get("dataset") != expect["dataset"]:
            problems.append(f"{name} was made for dataset {rec.get('dataset')!r}, the merge is for {expect['dataset']!r}")
        if diffs := _differences(rec.get("settings"), expect["settings"]):
            problems.append(f"{name} was made with other settings ({'; '.join(diffs)}; part vs merge)")
        if changed := _changed(rec.get("inputs"), expect["inputs"]):
            problems.append(f"{name} was made from other input files: {', '.join(changed)} differ (sha256) from what the "
                            "merge reads now")
    if problems:
        hint = ("Every job and the merge need the same dataset, options and --num-jobs; re-run the jobs named (a re-run "
                "replaces its part), then the merge. " if len(problems) > len(missing[:1]) else "")
        raise PartsError(f"cannot merge the parts in {staging}:\n  " + "\n  ".join(problems) +
                         f"\n{hint}--out was left as it was.")


def ordered_entries(found: dict[int, dict], layout: Sequence[tuple[str, int]], num_jobs: int, staging: Path) -> list[dict]:
    """The record of every shard of the conversion, in the one-job order (``layout``: (name,
    samples) per shard), each from the part that owns it, with ``job`` and ``part`` (its folder)
    added. A part that lacks one of its shards or lists one it should not have is refused."""
    listed = {i: {e["name"]: e for e in rec["shards"]} for i, rec in found.items()}
    problems, entries, owned = [], [], {i: set() for i in found}
    for seq, (name, samples) in enumerate(layout):
        job = owner(seq, num_jobs)
        owned[job].add(name)
        entry = listed[job].get(name)
        if entry is None or entry["samples"] != samples:
            problems.append(f"job {job}'s part lacks {name} ({samples} samples)" if entry is None else
                            f"job {job}'s part has {entry['samples']} samples in {name}, the dataset gives {samples}")
            continue
        entries.append(entry | {"job": job, "part": part_dir(staging, job)})
    for i, names in listed.items():
        if extra := sorted(set(names) - owned[i]):
            problems.append(f"job {i}'s part lists shards that are not its own: {', '.join(extra[:5])}")
    if problems:
        raise PartsError(f"cannot merge the parts in {staging}:\n  " + "\n  ".join(problems) +
                         "\nRe-run the jobs named, then the merge. --out was left as it was.")
    return entries


def place(entry: dict, dest: Path) -> str:
    """Put a part's shard at ``dest`` (a hard link: no copy; a copy where the filesystem has no
    links) and check it against its record; returns its sha256."""
    src = Path(entry["part"]) / entry["name"]
    if not src.is_file():
        raise PartsError(f"job {entry['job']}'s part lacks {src}, which its {RECORD} lists: re-run job {entry['job']}, "
                         "then the merge. --out was left as it was.")
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
    digest, size = file_sha256(dest), dest.stat().st_size
    if (digest, size) != (entry["sha256"], entry["bytes"]):
        raise PartsError(f"{src} differs from job {entry['job']}'s record ({size} bytes, sha256 {digest[:12]}... vs "
                         f"{entry['bytes']} bytes, {entry['sha256'][:12]}... recorded): it changed after the job wrote it. "
                         f"Re-run job {entry['job']}, then the merge. --out was left as it was.")
    return digest
