"""The synthetic MEL benchmark: determinism, on-disk format, designed ambiguity and ceilings, tokenizer, memory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from data_shards import synthetic
from data_shards.synthetic import PREFIX, SPLITS, TOPIC_WORDS, SyntheticSettings, generate, preset

TOPICS = set(TOPIC_WORDS)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate(out, preset("tiny"), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def data(tiny: Path) -> dict:
    kb = json.loads((tiny / "kb_entity.json").read_text())
    gen = json.loads((tiny / "generation.json").read_text())
    splits = {s: json.loads((tiny / f"{PREFIX}_{s}.json").read_text()) for s in SPLITS}
    cands: dict[str, list[dict]] = {}
    for line in (tiny / "candidates.jsonl").read_text().splitlines():
        row = json.loads(line)
        cands.setdefault(row["label"], []).append(row)
    groups: dict[str, list[int]] = {}
    for e in kb:
        groups.setdefault(unquote(e["entity_name"]), []).append(e["id"])
    topic = {}
    for e in kb:
        found = words(e["desc"]) & TOPICS
        assert len(found) == 1, e  # every description holds exactly its topic word
        topic[e["id"]] = found.pop()
    qid2id = json.loads((tiny / "qid2id.json").read_text())
    return dict(kb=kb, gen=gen, splits=splits, cands=cands, groups=groups, topic=topic, qid2id=qid2id)


def mentions(data: dict):
    """(split, mention, cue) of every mention, cue from the hidden cue string of generation.json."""
    for split in SPLITS:
        cues = data["gen"]["cues"][split]
        assert len(cues) == len(data["splits"][split])
        for m, cue in zip(data["splits"][split], cues, strict=True):
            yield split, m, cue


def test_same_seed_gives_identical_files_whatever_the_workers(tiny: Path, tmp_path: Path):
    generate(tmp_path / "again", preset("tiny"), workers=2, progress=False)  # the pool path (more than 512 images)
    assert tree_hashes(tmp_path / "again") == tree_hashes(tiny)
    generate(tmp_path / "other", preset("tiny", seed=1), workers=1, progress=False)
    other = tree_hashes(tmp_path / "other")
    ref = tree_hashes(tiny)
    for name in ("kb_entity.json", "qid2id.json", f"{PREFIX}_train.json", "candidates.jsonl", "tokenizer/tokenizer.json"):
        assert other[name] != ref[name], name


def test_kb_and_qid2id_format(tiny: Path, data: dict):
    kb = data["kb"]
    assert [e["id"] for e in kb] == list(range(len(kb)))
    assert all(set(e) == {"id", "qid", "entity_name", "desc", "image_list", "type"} and e["type"] == "entity" for e in kb)
    assert all(re.fullmatch(r"Q[1-9]\d*", e["qid"]) for e in kb)
    assert len({e["qid"] for e in kb}) == len(kb)
    text = (tiny / "qid2id.json").read_text()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line of JSON
    assert data["qid2id"] == {e["qid"]: e["id"] for e in kb}
    quoted = sum(e["entity_name"] != unquote(e["entity_name"]) for e in kb) / len(kb)
    assert 0.05 < quoted < 0.4  # about 20% URL-quoted
    for e in kb:
        assert 1 <= len(e["image_list"]) <= 2  # tiny: max_images_per_entity=2
        for name in e["image_list"]:
            with Image.open(tiny / "kb_image" / name) as im:
                assert im.format == "JPEG" and im.size == (32, 32)


def test_mentions_format(tiny: Path, data: dict):
    kb, qid2id = data["kb"], data["qid2id"]
    ids, nil = set(), 0
    for split, m, cue in mentions(data):
        assert set(m) == {"id", "sentence", "mentions", "entities", "imgPath", "answer", "desc"}
        assert m["id"].startswith(f"synth-{split}-") and m["id"] not in ids
        ids.add(m["id"])
        assert unquote(m["mentions"]) == m["entities"] and unquote(m["mentions"]) in m["sentence"]
        if m["imgPath"]:
            assert not m["imgPath"].endswith(".jpg")
            with Image.open(tiny / "mention_image" / (Path(m["imgPath"]).stem + ".jpg")) as im:
                assert im.format == "JPEG"
        else:
            assert cue in "nx"
        if m["answer"] == "nil":
            nil += 1
            assert cue == "x" and m["entities"] not in data["groups"]
            continue
        gold = kb[qid2id[m["answer"]]]
        assert unquote(gold["entity_name"]) == m["entities"]
        assert m["mentions"] == gold["entity_name"]  # quoted exactly when the name is
    assert nil == sum(data["gen"]["counts"]["splits"][s]["nil"] for s in SPLITS) > 0


def test_reader_reads_it(tiny: Path, data: dict):
    reader = pytest.importorskip("data_shards.reader")
    entities = reader.read_kb(tiny)
    qid2id = reader.read_qid2id(tiny)
    assert len(entities) == len(data["kb"]) and all(p.is_file() for e in entities for p in e.image_paths)
    for split in SPLITS:
        recs = reader.read_split(tiny, "synthetic", split, qid2id)
        assert recs.skipped_nil == data["gen"]["counts"]["splits"][split]["nil"]
        assert len(recs.mentions) + recs.skipped_nil == len(data["splits"][split])
        assert all(m.image_path is None or m.image_path.is_file() for m in recs.mentions)


def test_candidate_table(data: dict):
    kb_qids = set(data["qid2id"])
    for name, members in data["groups"].items():
        rows = data["cands"][name]
        assert {r["qid"] for r in rows if r["qid"] in kb_qids} == {data["kb"][i]["qid"] for i in members}
        distractors = [r for r in rows if r["qid"] not in kb_qids]
        assert len(distractors) <= 2
        member_topics = {data["topic"][i] for i in members}
        assert all(not (words(r["description"]) & member_topics) for r in distractors)
    assert set(data["cands"]) == set(data["groups"])
    assert sum(len(r) for r in data["cands"].values()) == data["gen"]["counts"]["candidate_rows"]


def test_name_groups_follow_the_knobs(data: dict):
    s = SyntheticSettings(**data["gen"]["settings"])
    sizes = sorted(len(v) for v in data["groups"].values())
    assert set(sizes) == {1, s.group_size}
    shared = sum(n for n in sizes if n > 1) / len(data["kb"])
    assert shared == pytest.approx(s.ambiguity, abs=0.02)
    for members in data["groups"].values():  # topics distinct within a group
        assert len({data["topic"][i] for i in members}) == len(members)
    real = [(m, cue) for _, m, cue in mentions(data) if cue != "x"]
    ambiguous = sum(len(data["groups"][m["entities"]]) > 1 for m, _ in real) / len(real)
    assert ambiguous == pytest.approx(s.ambiguity, abs=0.02)
    cues = "".join(c for _, c in real)
    assert cues.count("i") / len(cues) == pytest.approx(s.image_cue_rate, abs=0.02)
    assert (cues.count("t") + cues.count("n")) / len(cues) == pytest.approx(s.text_cue_rate, abs=0.02)
    assert cues.count("n") / (cues.count("t") + cues.count("n")) == pytest.approx(s.missing_image_rate, abs=0.03)


def test_text_cues_and_the_dme_description(data: dict):
    random_desc_hits = random_desc_total = 0
    for _, m, cue in mentions(data):
        if cue == "x":
            continue
        gold = data["qid2id"][m["answer"]]
        group = data["groups"][m["entities"]]
        sentence_topics = words(m["sentence"]) & TOPICS
        rows = data["cands"][m["entities"]]
        gold_desc = next(r["description"] for r in rows if r["qid"] == m["answer"])
        if cue == "i":
            assert not sentence_topics & {data["topic"][i] for i in group}
            assert not sentence_topics  # generic filler only
            assert m["desc"] in {r["description"] for r in rows}
            random_desc_total += 1
            random_desc_hits += m["desc"] == gold_desc
        else:
            assert sentence_topics == {data["topic"][gold]}
            assert m["desc"] == gold_desc
    # A random row of the label: the gold's description only about 1/(rows per label) of the time.
    assert 0.05 < random_desc_hits / random_desc_total < 0.6


def mention_image(tiny: Path, m: dict) -> np.ndarray:
    with Image.open(tiny / "mention_image" / (Path(m["imgPath"]).stem + ".jpg")) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def has_signature(img: np.ndarray) -> bool:
    """The centre cells are a flat neutral colour unless a signature shape is drawn over them."""
    s = img.shape[0]
    centre = img[s // 4 + 1: 3 * s // 4 - 1, s // 4 + 1: 3 * s // 4 - 1]
    return float(np.abs(centre - synthetic.BACKGROUND_COLOURS[-1]).mean()) > 12.0


def test_ceilings_match_a_simulation_of_ideal_choosers(tiny: Path, data: dict):
    kb, n = data["kb"], len(data["kb"])
    kb_img = {}
    sims: dict[str, dict[str, list[float]]] = {s: {"text_only": [], "image_only": []} for s in SPLITS}
    nn_right = nn_total = 0
    for split, m, cue in mentions(data):
        if m["answer"] == "nil":
            continue
        gold = data["qid2id"][m["answer"]]
        group = data["groups"][unquote(m["mentions"])]
        # Ideal text-only: the name gives the group, a topic word in the sentence the entity.
        said = words(m["sentence"]) & TOPICS
        choice = [i for i in group if data["topic"][i] in said] or group
        sims[split]["text_only"].append(1.0 / len(choice) if gold in choice else 0.0)
        # Ideal image-only: signature -> the entity; background only -> the group; no image -> all N.
        if not m["imgPath"]:
            sims[split]["image_only"].append(1.0 / n)
            continue
        img = mention_image(tiny, m)
        if has_signature(img):
            assert cue in "ib"
            sims[split]["image_only"].append(1.0)
            # ... and a plain nearest-neighbour pixel match among the group's images mostly finds it.
            for f in (f for i in group for f in kb[i]["image_list"] if f not in kb_img):
                with Image.open(tiny / "kb_image" / f) as im:
                    kb_img[f] = np.asarray(im.convert("RGB"), dtype=np.float32)
            best = min((float(((img - kb_img[f]) ** 2).mean()), i) for i in group for f in kb[i]["image_list"])
            nn_right += best[1] == gold
            nn_total += 1
        else:
            assert cue == "t"
            sims[split]["image_only"].append(1.0 / len(group))
    assert nn_right / nn_total > 0.9
    ceilings = data["gen"]["ceilings"]
    for split in SPLITS:
        for model in ("text_only", "image_only"):
            assert ceilings["realised"][split][model] == pytest.approx(float(np.mean(sims[split][model])), abs=1e-9)
        assert ceilings["realised"][split]["both"] == 1.0
    everything = {k: float(np.mean([v for s in SPLITS for v in sims[s][k]])) for k in ("text_only", "image_only")}
    for model, value in everything.items():
        assert ceilings["realised"]["all"][model] == pytest.approx(value, abs=1e-9)
        assert ceilings["designed"][model] == pytest.approx(value, abs=0.02)
    assert ceilings["designed"] == synthetic.designed_ceilings(SyntheticSettings(**data["gen"]["settings"]))


def test_default_ceilings_need_both_modalities():
    c = synthetic.designed_ceilings(SyntheticSettings())
    assert 0.55 <= c["text_only"] <= 0.75 and 0.55 <= c["image_only"] <= 0.75 and c["both"] == 1.0
    no_kb_images = synthetic.designed_ceilings(dataclasses.replace(SyntheticSettings(), kb_images=False))
    assert no_kb_images["both"] == c["text_only"] and no_kb_images["image_only"] < 0.01


def test_tokenizer(tiny: Path, data: dict):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    assert isinstance(tok, PreTrainedTokenizerFast)
    bos, eos, pad, unk = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id
    assert None not in (bos, eos, pad, unk) and len({bos, eos, pad, unk}) == 4
    sep = tok.convert_tokens_to_ids("[SEP]")
    assert sep not in (unk, None) and "[SEP]" not in tok.all_special_tokens
    ids = tok("abc [SEP] def", max_length=50, padding="max_length", truncation=True)["input_ids"]
    assert len(ids) == 50 and ids[0] == bos and ids[2] == sep and ids[4] == eos and set(ids[5:]) == {pad}
    assert tok("painter")["input_ids"] == [bos, tok.convert_tokens_to_ids("painter"), eos]
    long = tok("the " * 80, max_length=50, truncation=True)["input_ids"]
    assert len(long) == 50 and long[0] == bos and long[-1] == eos
    # The whole synthetic vocabulary is known: the model's texts tokenize without [UNK].
    texts = [f"{unquote(e['entity_name'])} [SEP] {e['desc']}" for e in data["kb"]]
    texts += [f"{unquote(m['mentions'])} [SEP] {m['sentence']} [SEP] {m['desc']}" for _, m, _ in mentions(data)]
    texts += [" ".join(r["aliases"]) for rows in data["cands"].values() for r in rows]
    assert all(unk not in row for row in tok(texts)["input_ids"])


def test_refuses_non_empty_folder_and_leaves_nothing_half_written(tmp_path: Path, monkeypatch):
    small = SyntheticSettings(num_entities=20, num_train=10, num_dev=4, num_test=4, image_size=16)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate(out, small, progress=False)
    generate(out, small, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "generation.json").is_file()

    def boom(*args, **kwargs):
        raise RuntimeError("crash")

    monkeypatch.setattr("data_shards.synthetic.build.write_tokenizer", boom)  # where generate looks it up
    with pytest.raises(RuntimeError):
        generate(tmp_path / "crashed", small, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no half dataset, no temp folder


def test_extra_entities_grow_the_kb_and_leave_every_other_file_as_it_was(tiny, tmp_path):
    grown = tmp_path / "grown"
    generate(grown, preset("tiny", extra_entities=300), workers=1, progress=False)
    before, after = tree_hashes(tiny), tree_hashes(grown)
    changed = {p for p in before if after.get(p) != before[p]}
    assert changed == {"kb_entity.json", "qid2id.json", "generation.json"}  # splits, images, tokenizer, candidates: same
    kb, kb0 = json.loads((grown / "kb_entity.json").read_text()), json.loads((tiny / "kb_entity.json").read_text())
    assert kb[:200] == kb0 and [r["id"] for r in kb] == list(range(500))
    qid2id = json.loads((grown / "qid2id.json").read_text())
    assert len(qid2id) == 500 and all(qid2id[r["qid"]] == r["id"] for r in kb)  # QIDs distinct, none reused
    vocab = set(json.loads((grown / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    extra = kb[200:]
    assert all(words(r["desc"]) <= vocab and words(r["entity_name"]) <= vocab for r in extra)  # the same tokenizer reads them
    assert all(1 <= len(r["image_list"]) <= 2 and (grown / "kb_image" / r["image_list"][0]).is_file() for r in extra)
    assert sum(p.startswith("kb_image/") for p in after) - sum(p.startswith("kb_image/") for p in before) == sum(
        len(r["image_list"]) for r in extra)
    names = {r["entity_name"] for r in kb0}
    assert 0 < sum(r["entity_name"] in names for r in extra) < 300  # many share a world name: distractors
    assert json.loads((grown / "generation.json").read_text())["counts"]["entities"] == 500
