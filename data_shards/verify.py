"""Check a shards folder against its manifest: the size and sha256 of every shard and of the entity index.

    python -m data_shards.verify SHARDS [--groups kb dev ...] [--quiet]

Exit status 0 when every file matches, 1 with the list of bad files otherwise (2: no manifest).
The trainer runs the same check before training with ``data.verify_checksums: true``, and
evaluation before it ranks anything (``eval.verify_checksums``, on by default), so a result never
cites a manifest whose shards differ. Manifests written before sizes were recorded are checked
by sha256 alone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from core.hashing import file_sha256
from data_shards.store import ShardError
from data_shards.stream import load_manifest


@dataclass(frozen=True)
class FileCheck:
    name: str  # relative to the shards folder
    sha256: str
    size: int | None  # None: not recorded (older manifests)


def expected_files(manifest: dict, groups: list[str] | None = None) -> list[FileCheck]:
    """The files of ``groups`` (all when None) with their recorded digests; the KB's index goes with the KB."""
    shards = manifest["shards"]
    unknown = sorted(set(groups or []) - set(shards))
    if unknown:
        raise KeyError(f"the manifest has no {unknown} shards (it has {sorted(shards)})")
    files = [FileCheck(e["name"], e["sha256"], e.get("bytes")) for g in (groups or list(shards)) for e in shards[g]]
    if (groups is None or "kb" in groups) and manifest.get("entity_index_sha256"):
        files.append(FileCheck(manifest["entity_index"], manifest["entity_index_sha256"], None))
    return files


def verify(shard_root: Path | str, groups: list[str] | None = None, progress: bool = True,
           part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems found (empty: every file matches). ``part=(r, n)`` checks every n-th file from the
    r-th, so n processes can share the work."""
    root = Path(shard_root)
    files = expected_files(load_manifest(root), groups)[part[0]::part[1]]
    problems: list[str] = []
    present = [f for f in files if (root / f.name).is_file()]
    total = sum((root / f.name).stat().st_size for f in present)
    with tqdm(total=total, desc=f"verify {root.name}", unit="B", unit_scale=True, disable=not progress or None) as bar:
        for f in files:
            path = root / f.name
            if not path.is_file():
                problems.append(f"{f.name}: missing")
                continue
            size = path.stat().st_size
            if f.size is not None and size != f.size:
                problems.append(f"{f.name}: {size} bytes, the manifest says {f.size}")
                bar.update(size)
                continue
            digest = file_sha256(path, on_block=bar.update)
            if digest != f.sha256:
                problems.append(f"{f.name}: sha256 {digest[:16]}..., the manifest says {f.sha256[:16]}...")
    return problems


def problems_message(shard_root: Path | str, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return (f"{shard_root}: {len(problems)} file(s) differ from manifest.json:\n  {shown}\n"
            "Convert the dataset again (python -m data_shards.convert) or restore these files.")


def require_verified(shard_root: Path | str, groups: list[str] | None = None, progress: bool = True) -> None:
    """Raise ShardError listing every file that does not match the manifest."""
    problems = verify(shard_root, groups, progress)
    if problems:
        raise ShardError(problems_message(shard_root, problems))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_shards.verify",
                                description="Check every shard's size and sha256 against the folder's manifest.json.")
    p.add_argument("shards", type=Path, help="output folder of python -m data_shards.convert")
    p.add_argument("--groups", nargs="+", default=None, help="only these groups (kb, train, dev, test); default: all")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        problems = verify(a.shards, a.groups, progress=not a.quiet)
        n = len(expected_files(load_manifest(a.shards), a.groups))
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if problems:
        print(problems_message(a.shards, problems), file=sys.stderr)
        return 1
    print(f"{a.shards}: all {n} files match manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
