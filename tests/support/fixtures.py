"""Small datasets written by hand in the released MIMIC/MMoE formats (real JPEG files)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from PIL import Image

SPLIT_FILES = {
    "wikimel": "WIKIMEL_{split}.json",
    "richpediamel": "RichpediaMEL_{split}.json",
    "wikidiverse": "wiki_diverse_{split}.json",  # MIMIC naming
    "wikidiverse-mmoe": "WikiDiverse_{split}.json",  # MMoE's re-release naming
}
MENTION_DIRS = {"richpediamel": "mention_images"}

ENTITIES = [  # (qid, name, description, number of images)
    ("Q100", "Paris", "capital of France", 2),
    ("Q200", "Paris Hilton", "American media personality", 1),
    ("Q300", "Jordan", "country in Western Asia", 1),
    ("Q400", "Michael Jordan", "American basketball player", 3),
    ("Q500", "Jordan River", "river in the Middle East", 0),
    ("Q600", "São Paulo", "city in Brazil", 1),
]


def jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    for x in range(size[0] // 2):  # some structure so that resizing/cropping is visible
        img.putpixel((x, x % size[1]), (255 - color[0], 0, 0))
    img.save(path, format="JPEG")


def write_fixture(root: Path, dataset: str = "wikimel", *, mmoe_desc: bool = True, shuffled_kb: bool = False,
                  mention_dir: str | None = None) -> dict:
    """Write a complete dataset folder; returns facts the tests check against. ``dataset``: a key of
    SPLIT_FILES, or a split-file pattern such as 'MyArt_{split}.json' (a new dataset)."""
    root.mkdir(parents=True, exist_ok=True)
    kb = []
    for i, (qid, name, desc, n_img) in enumerate(ENTITIES):
        images = [f"{qid}_{j}.jpg" for j in range(n_img)]
        for j, img in enumerate(images):
            jpeg(root / "kb_image" / img, (40 * i, 30 * j, 100))
        rec = {"id": i, "qid": qid, "entity_name": quote(name) if " " in name or not name.isascii() else name,
               "image_list": images, "type": "entity"}
        rec["desc" if mmoe_desc else "attr"] = desc
        kb.append(rec)
    if shuffled_kb:
        kb = kb[::-1]
    (root / "kb_entity.json").write_text(json.dumps(kb, indent=2))
    (root / "qid2id.json").write_text(json.dumps({q: i for i, (q, *_rest) in enumerate(ENTITIES)}))  # one line

    mention_path = root / (mention_dir or MENTION_DIRS.get(dataset, "mention_image"))
    pattern = SPLIT_FILES.get(dataset, dataset)
    splits = {
        "train": [
            ("m1", "Paris is lovely in spring", "Paris", "Paris", "WikiMEL/img/m1.png", "Q100"),
            ("m2", "Michael Jordan dunks", "Michael Jordan", "Michael Jordan", "m2.jpeg", "Q400"),
            ("m3", "nothing to link here", "here", "", "", "nil"),
            ("m4", "She visited São Paulo", "São Paulo", "São Paulo", "", "Q600"),
            ("m5", "Paris Hilton at a party", "Paris Hilton", "Paris Hilton", "sub/dir/m5.gif", "Q200"),
        ],
        "dev": [("d1", "The Jordan River floods", "Jordan River", "Jordan River", "d1.png", "Q500")],
        "test": [
            ("t1", "Jordan borders Israel", "Jordan", "Jordan", "t1.png", "Q300"),
            ("t2", "Air Jordan", "Jordan", "Michael Jordan", "t2.png", "Q400"),
        ],
    }
    for split, rows in splits.items():
        records = []
        for mid, sentence, mention, gold, img, answer in rows:
            rec = {"id": mid, "sentence": sentence, "mentions": quote(mention), "entities": gold,
                   "imgPath": img, "answer": answer}
            if mmoe_desc:
                rec["desc"] = f"desc of {mid}"
            records.append(rec)
            if img:
                jpeg(mention_path / (Path(img).stem + ".jpg"), (200, 10, 10), size=(30, 50))
        (root / pattern.format(split=split)).write_text(json.dumps(records))
    return {"splits": splits, "mention_dir": mention_path}
