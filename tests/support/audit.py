"""Shared by tests/unit/test_audit.py and tests/integration/test_audit.py."""

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

PATTERN = "SyntheticMEL_{split}.json"


def _load(root: Path, split: str) -> list[dict]:
    return json.loads((root / PATTERN.format(split=split)).read_text())


def _save(root: Path, split: str, records: list[dict]) -> None:
    (root / PATTERN.format(split=split)).write_text(json.dumps(records))


@pytest.fixture
def planted(tiny_raw, tmp_path) -> tuple[Path, dict]:
    """A copy of the tiny benchmark with leaks planted into dev and test."""
    root = tmp_path / "planted"
    shutil.copytree(tiny_raw, root)
    kb = {e["qid"]: e for e in json.loads((root / "kb_entity.json").read_text())}
    train, dev, test = (_load(root, sp) for sp in ("train", "dev", "test"))
    real = [r for r in train if r["answer"] != "nil"]
    # 1. an exact and a near duplicate (case, punctuation, spacing) of train mentions, under new ids
    test.append(dict(real[0], id="plant-exact"))
    near = dict(real[1], id="plant-near")
    near["sentence"] = "  " + near["sentence"].upper().replace(" ", " ,  ") + " !"
    dev.append(near)
    # 2. test mentions whose image is a KB image of their gold: byte copy, and resized + re-encoded
    with_img = [r for r in test if r["imgPath"] and r["answer"] != "nil" and kb[r["answer"]]["image_list"]]
    byte_copy, re_encoded = with_img[0], with_img[1]
    mdir = root / "mention_image"
    shutil.copy(root / "kb_image" / kb[byte_copy["answer"]]["image_list"][0], mdir / (Path(byte_copy["imgPath"]).stem + ".jpg"))
    with Image.open(root / "kb_image" / kb[re_encoded["answer"]]["image_list"][-1]) as img:
        buf = io.BytesIO()
        img.convert("RGB").resize((96, 96), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=70)
    (mdir / (Path(re_encoded["imgPath"]).stem + ".jpg")).write_bytes(buf.getvalue())
    # 3. a dev description copied from the gold's KB description (case changed)
    copied = next(r for r in dev if r["answer"] != "nil")
    copied["desc"] = kb[copied["answer"]]["desc"].upper()
    for sp, recs in (("dev", dev), ("test", test)):
        _save(root, sp, recs)
    return root, {"byte": byte_copy["id"], "re_encoded": re_encoded["id"], "desc": copied["id"]}
