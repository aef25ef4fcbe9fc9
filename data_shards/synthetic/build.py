"""Building a whole dataset: ``generate`` draws the world and the splits, writes every file into a
temporary folder beside the target (images in worker processes while this one writes the JSON files),
records the summary in generation.json, and renames the folder into place at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_shards.synthetic.images import write_images
from data_shards.synthetic.mentions import Mention, ceilings_of, designed_ceilings, make_split
from data_shards.synthetic.settings import SyntheticSettings
from data_shards.synthetic.texts import vocabulary
from data_shards.synthetic.world import World, build_extras, build_world
from data_shards.synthetic.writers import (
    FORMAT_VERSION,
    PREFIX,
    SPLITS,
    image_tasks,
    write_candidates,
    write_kb,
    write_splits,
    write_tokenizer,
)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def generate(out_dir: Path, settings: SyntheticSettings, overwrite: bool = False, workers: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Write the dataset to `out_dir` and return the summary also written to generation.json.

    Refuses a non-empty `out_dir` unless `overwrite`. `workers` (default: the usable cores) only changes
    the speed of image writing, never the files.
    """
    settings.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        summary = _generate_into(tmp, settings, workers if workers is not None else _default_workers(), progress)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _generate_into(root: Path, s: SyntheticSettings, workers: int, progress: bool) -> dict[str, Any]:
    """Every file of the dataset, written into the empty folder `root`; the summary."""
    counts = {"train": s.num_train, "dev": s.num_dev, "test": s.num_test}
    world = build_world(s, num_nil_names=sum(counts.values()))
    extras = build_extras(s, world)
    nil_base = world.num_groups
    splits: dict[str, list[Mention]] = {}
    for si, split in enumerate(SPLITS):
        splits[split] = make_split(world, si, split, counts[split], nil_base)
        nil_base += counts[split]
    (root / "kb_image").mkdir()
    (root / "mention_image").mkdir()

    # Images go to worker processes while this one writes the JSON files.
    kb_images = int(world.n_images.sum()) + int(extras.n_images.sum())
    num_images = kb_images + sum(m.image_task is not None for ms in splits.values() for m in ms)
    tasks = image_tasks(world, extras, root, splits)
    chunk = 128
    pool = None
    if workers > 1 and num_images > 4 * chunk:
        pool = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)
        pending = pool.imap_unordered(write_images, _chunks(tasks, chunk))
    try:
        write_kb(world, extras, root, progress)
        cand_rows = write_candidates(world, root, progress)
        write_splits(root, splits, progress)
        with tqdm(total=num_images, desc="images", unit="img", disable=not progress) as bar:
            if pool is not None:
                for done in pending:
                    bar.update(done)
            else:
                for part in _chunks(tasks, chunk):
                    bar.update(write_images(part))
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    words = vocabulary([*world.given, *world.family, *(r.lower() for r in world.regions)])
    vocab_size = write_tokenizer(root / "tokenizer", words)
    summary = _summary(s, world, splits, cand_rows=cand_rows, kb_images=kb_images, num_images=num_images, vocab_size=vocab_size)
    (root / "generation.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def _summary(s: SyntheticSettings, world: World, splits: dict[str, list[Mention]], cand_rows: int, kb_images: int,
             num_images: int, vocab_size: int) -> dict[str, Any]:
    """The content of generation.json: settings, counts, designed and realised ceilings, the hidden cues."""
    split_counts = {}
    for split, ms in splits.items():
        cues = "".join(m.cue for m in ms)
        real = [m for m in ms if m.cue != "x"]
        split_counts[split] = {
            "mentions": len(ms), "nil": cues.count("x"), "text_cue": cues.count("t") + cues.count("n"),
            "image_cue": cues.count("i"), "both_cues": cues.count("b"), "no_image": sum(m.image_task is None for m in ms),
            "ambiguous_share": sum(m.group_size > 1 for m in real) / max(1, len(real)),
        }
    return {
        "format_version": FORMAT_VERSION,
        "dataset": PREFIX,
        "seed": s.seed,
        "settings": dataclasses.asdict(s),
        "counts": {
            "entities": world.n + s.extra_entities, "extra_entities": s.extra_entities, "name_groups": world.num_groups,
            "multi_entity_groups": world.num_multi,
            "ambiguous_entity_share": world.num_multi * s.group_size / world.n if s.group_size > 1 else 0.0,
            "quoted_name_groups": int(world.quoted.sum()), "candidate_rows": cand_rows,
            "distractor_rows": int(world.n_distractors.sum()), "kb_images": kb_images,
            "mention_images": num_images - kb_images, "vocab_size": vocab_size, "splits": split_counts,
        },
        "ceilings": {
            "designed": designed_ceilings(s),
            "realised": {split: ceilings_of(ms, world.n, s.kb_images) for split, ms in splits.items()}
            | {"all": ceilings_of([m for ms in splits.values() for m in ms], world.n, s.kb_images)},
        },
        "cues": {split: "".join(m.cue for m in ms) for split, ms in splits.items()},
        "cue_legend": {"t": "text cue, background-only image", "n": "text cue, no image", "i": "image cue",
                       "b": "both cues", "x": "nil"},
    }

