"""Check a shards folder against its manifest: the size and sha256 of every shard and of the entity index.

    python -m data_shards.verify SHARDS [--groups kb dev ...] [--quiet]

Exit status 0 when every file matches, 1 with the list of bad files otherwise (2: no manifest).
The trainer runs the same check before training with ``data.verify_checksums: true``, and
evaluation before it ranks anything (``eval.verify_checksums``, on by default), so a result never
cites a manifest whose shards differ. Manifests written before sizes were recorded are checked
by sha256 alone. The checks are ``data_shards/folder.py: ShardFolder.problems`` (and
``ShardFolder.verify``, shared over the ranks of a job).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_shards.folder import ShardFolder, problems_message


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_shards.verify",
                                description="Check every shard's size and sha256 against the folder's manifest.json.")
    p.add_argument("shards", type=Path, help="output folder of python -m data_shards.convert")
    p.add_argument("--groups", nargs="+", default=None, help="only these groups (kb, train, dev, test); default: all")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        folder = ShardFolder(a.shards)
        problems = folder.problems(a.groups, progress=not a.quiet)
        n = len(folder.expected_files(a.groups))
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
