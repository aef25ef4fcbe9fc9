"""The command line: ``python -m data_shards.synthetic --out DIR [--preset tiny|demo|large|million] [--seed N]
[--set key=value ...] [--overwrite] [--workers N] [--quiet]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from data_shards.synthetic.build import generate
from data_shards.synthetic.settings import PRESETS, SyntheticSettings, preset

DESCRIPTION = "A seeded synthetic multimodal entity linking (MEL) benchmark, written in the MIMIC on-disk format."


def _parse_set(settings: SyntheticSettings, items: list[str]) -> SyntheticSettings:
    types = {f.name: f.type for f in dataclasses.fields(SyntheticSettings)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--set {item!r}: expected key=value with key one of {sorted(types)}")
        kind = types[key]
        try:
            if kind in ("bool", bool):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                changes[key] = value.lower() in ("1", "true", "yes")
            elif kind in ("int", int):
                changes[key] = int(value.replace("_", ""))
            else:
                changes[key] = float(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a valid {kind}") from None
    return dataclasses.replace(settings, **changes)


def main(argv: list[str] | None = None) -> int:
    """Generate a dataset as the command line asks; 0 on success, 2 when the target or a setting is refused."""
    parser = argparse.ArgumentParser(prog="python -m data_shards.synthetic", description=DESCRIPTION)
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a SyntheticSettings field (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--workers", type=int, default=None, help="image-writing processes (default: usable cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    settings = preset(args.preset)
    if args.seed is not None:
        settings = dataclasses.replace(settings, seed=args.seed)
    settings = _parse_set(settings, args.sets)
    start = time.perf_counter()
    try:
        summary = generate(args.out, settings, overwrite=args.overwrite, workers=args.workers, progress=not args.quiet)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = summary["counts"]
    ceil = summary["ceilings"]["designed"]
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s: {c['entities']} entities, {c['name_groups']} names, "
          + ", ".join(f"{k} {v['mentions']}" for k, v in c["splits"].items())
          + f", {c['kb_images'] + c['mention_images']} images")
    print("designed H@1 ceilings: " + ", ".join(f"{k} {v:.3f}" for k, v in ceil.items()))
    return 0

