"""The writers of the MIMIC-format files (the layout ``data_shards.reader`` reads; see the package
docstring for each file): the KB and ``qid2id.json``, the DME candidate table, the split files, the
list of images to draw, and the word-level tokenizer (``data_shards.tokenizer``'s writer).

The KB and the candidate table are streamed in chunks, so memory stays bounded whatever the KB size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from data_shards.synthetic.mentions import Mention
from data_shards.synthetic.world import ExtraEntities, World
from data_shards.tokenizer import write_word_tokenizer

PREFIX = "SyntheticMEL"
SPLITS = ("train", "dev", "test")
FORMAT_VERSION = 1


def write_tokenizer(out_dir: Path, words: list[str]) -> int:
    """A word-level tokenizer: pad 0, unk 1, [SEP] 2, words, then bos and eos as the last two ids (CLIP's order).
    The writer is data_shards.tokenizer's, which also builds one from any dataset."""
    return write_word_tokenizer(out_dir, words)


def _kb_record(world: World, extras: ExtraEntities, e: int) -> dict:
    if e >= world.n:
        return extras.record(world, e - world.n)
    slot = int(world.entity_slot[e])
    group = world.group_of_slot(slot)
    return {"id": e, "qid": world.qid(e), "entity_name": world.surface(group),
            "desc": world.entity_desc(slot, world.name(group)), "image_list": world.image_names(e), "type": "entity"}


def write_kb(world: World, extras: ExtraEntities, root: Path, progress: bool) -> None:
    """kb_entity.json (a JSON list in id order: the world's entities, then the extra ones) and qid2id.json
    (one line), streamed in chunks of entities."""
    chunk = 4096
    total = world.n + len(extras)
    with open(root / "kb_entity.json", "w", encoding="utf-8") as kb, open(root / "qid2id.json", "w", encoding="utf-8") as q2i, \
            tqdm(total=total, desc="kb entities", unit="ent", disable=not progress) as bar:
        kb.write("[")
        q2i.write("{")
        for start in range(0, total, chunk):
            kb_parts, q_parts = [], []
            for e in range(start, min(total, start + chunk)):
                rec = _kb_record(world, extras, e)
                kb_parts.append(json.dumps(rec, ensure_ascii=False))
                q_parts.append(f"{json.dumps(rec['qid'])}: {e}")
            sep = ",\n" if start else ""
            kb.write(sep + ",\n".join(kb_parts))
            q2i.write((", " if start else "") + ", ".join(q_parts))
            bar.update(len(kb_parts))
        kb.write("]\n")
        q2i.write("}\n")


def write_candidates(world: World, root: Path, progress: bool) -> int:
    """candidates.jsonl, the description table of the DME step, name group after name group; the row count."""
    rows = 0
    with open(root / "candidates.jsonl", "w", encoding="utf-8") as fh:
        buf: list[str] = []
        for group in tqdm(range(world.num_groups), desc="candidate table", unit="name", disable=not progress, mininterval=0.5):
            for row in world.candidate_rows(group):
                buf.append(json.dumps(row, ensure_ascii=False))
            if len(buf) >= 4096:
                rows += len(buf)
                fh.write("\n".join(buf) + "\n")
                buf = []
        rows += len(buf)
        if buf:
            fh.write("\n".join(buf) + "\n")
    return rows


def write_splits(root: Path, splits: dict[str, list[Mention]], progress: bool) -> None:
    """The split files ``SyntheticMEL_{train,dev,test}.json``: a JSON list of mention records each."""
    for split in tqdm(SPLITS, desc="splits", disable=not progress):
        with open(root / f"{PREFIX}_{split}.json", "w", encoding="utf-8") as fh:
            fh.write("[" + ",\n".join(json.dumps(m.record, ensure_ascii=False) for m in splits[split]) + "]\n")


def image_tasks(world: World, extras: ExtraEntities, root: Path, splits: dict[str, list[Mention]]) -> Iterator[tuple]:
    """(path, size, noise, background, signature, seed) of every image, generated lazily."""
    s = world.s
    if s.kb_images:
        kb_dir = root / "kb_image"
        for e in range(world.n):
            slot = int(world.entity_slot[e])
            bg, sig = world.background(world.group_of_slot(slot)), int(world.signature[slot])
            for k, name in enumerate(world.image_names(e)):
                yield (str(kb_dir / name), s.image_size, s.image_noise, bg, sig, (s.seed, 1, e, k))
        for x in range(len(extras)):
            bg, sig = int(extras.background[x]), int(extras.signature[x])
            for k, name in enumerate(extras.image_names(x)):
                yield (str(kb_dir / name), s.image_size, s.image_noise, bg, sig, (s.seed, 3, x, k))
    m_dir = root / "mention_image"
    for si, split in enumerate(SPLITS):
        for k, m in enumerate(splits[split]):
            if m.image_task is not None:
                stem = Path(m.record["imgPath"]).stem
                yield (str(m_dir / f"{stem}.jpg"), s.image_size, s.image_noise, *m.image_task, (s.seed, 2, si, k))

