"""The mentions of the synthetic benchmark, and the Hit@1 ceilings they allow.

``make_split`` draws one split: the gold entities (stratified into ambiguous and unambiguous golds in
the KB's proportion), the hidden cue of each mention (``t`` text cue with a background-only image,
``n`` text cue without image, ``i`` image cue, ``b`` both, ``x`` nil) in exact shares per stratum, the
sentence, the DME-style ``desc`` and the mention image to draw. ``designed_ceilings`` gives the
analytic ceilings of the settings, ``ceilings_of`` the ones realised on a list of mentions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_shards.synthetic.images import NUM_SIGNATURES
from data_shards.synthetic.settings import SyntheticSettings
from data_shards.synthetic.texts import (
    ADJ_WORDS,
    CAND_TEMPLATE,
    IMAGE_TEMPLATES,
    PLACE_WORDS,
    TEXT_TEMPLATES,
    TOPIC_WORDS,
    VERB_WORDS,
    WHEN_WORDS,
    fill_template,
)
from data_shards.synthetic.world import World, num_multi_groups


@dataclass
class Mention:
    """One mention record (the split file's JSON object), its hidden cue and the image to draw for it."""

    record: dict[str, Any]
    cue: str  # t, n, i, b, x (see the package docstring)
    group_size: int  # entities sharing the mention's name (0 for nil)
    image_task: tuple[int, int] | None  # (background, signature) of the mention image


def make_split(world: World, split_index: int, split: str, count: int, nil_name_base: int) -> list[Mention]:
    """`count` mentions of split `split` (seeded by ``[seed, 10 + split_index]``); nil mentions take the
    names from index `nil_name_base` on, past the KB's name groups."""
    s = world.s
    rng = np.random.default_rng([s.seed, 10 + split_index])
    n_nil = int(round(s.nil_rate * count))
    n_real = count - n_nil
    is_nil = np.zeros(count, dtype=bool)
    is_nil[rng.choice(count, n_nil, replace=False)] = True
    # Stratified: ambiguous and unambiguous golds in the KB's proportion, each stratum with exact cue
    # shares, so the realised ceilings sit close to the designed ones even on small splits.
    multi_slots = world.num_multi * s.group_size
    n_amb = int(round(multi_slots / world.n * n_real))
    cue_parts, slot_parts = [], []
    for size, lo, hi in ((n_amb, 0, multi_slots), (n_real - n_amb, multi_slots, world.n)):
        n_text = int(round(s.text_cue_rate * size))
        n_image = min(size - n_text, int(round(s.image_cue_rate * size)))
        n_missing = int(round(s.missing_image_rate * n_text))
        cue_parts.append(["n"] * n_missing + ["t"] * (n_text - n_missing) + ["i"] * n_image + ["b"] * (size - n_text - n_image))
        slot_parts.append(rng.integers(lo, hi, size) if size else np.zeros(0, dtype=np.int64))
    order = rng.permutation(n_real)
    cues = np.array(cue_parts[0] + cue_parts[1], dtype="<U1")[order]
    gold = world.slot_entity[np.concatenate(slot_parts)][order]
    fill = rng.integers(0, [len(WHEN_WORDS), len(VERB_WORDS), len(PLACE_WORDS), len(ADJ_WORDS)], (count, 4))
    tmpl = rng.integers(0, len(TEXT_TEMPLATES), count)
    desc_pick = rng.random(count)
    nil_topic = rng.integers(0, len(TOPIC_WORDS), count)
    nil_region = rng.integers(0, len(world.regions), count)
    nil_image = rng.random(count) < 0.5
    nil_sig = rng.integers(0, NUM_SIGNATURES, count)

    width = max(6, len(str(count - 1)))
    out: list[Mention] = []
    real = 0
    for k in range(count):
        mid = f"synth-{split}-{k:0{width}d}"
        vals = tuple(int(v) for v in fill[k])
        if is_nil[k]:
            name_index = nil_name_base + k
            name = world.name(name_index)
            topic = TOPIC_WORDS[nil_topic[k]]
            desc = CAND_TEMPLATE.format(adj=ADJ_WORDS[vals[3]], topic=topic, region=world.regions[nil_region[k]])
            image = (world.background(name_index), int(nil_sig[k])) if nil_image[k] else None
            rec = {"id": mid, "sentence": fill_template(TEXT_TEMPLATES[tmpl[k]], name, topic, vals), "mentions": name,
                   "entities": name, "imgPath": f"{mid}.png" if image else "", "answer": "nil", "desc": desc}
            out.append(Mention(rec, "x", 0, image))
            continue
        cue = str(cues[real])
        entity = int(gold[real])
        real += 1
        slot = int(world.entity_slot[entity])
        group = world.group_of_slot(slot)
        name = world.name(group)
        topic = TOPIC_WORDS[world.topic[slot]]
        if cue == "i":
            sentence = fill_template(IMAGE_TEMPLATES[tmpl[k]], name, "", vals)
        else:
            sentence = fill_template(TEXT_TEMPLATES[tmpl[k]], name, topic, vals)
        if cue == "i":  # the DME step cannot tell: a random row of the label
            rows = world.candidate_rows(group)
            desc = rows[int(desc_pick[k] * len(rows))]["description"]
        else:
            desc = world.cand_desc(slot)
        image = None
        if cue != "n":
            image = (world.background(group), int(world.signature[slot]) if cue in "ib" else -1)
        rec = {"id": mid, "sentence": sentence, "mentions": world.surface(group), "entities": name,
               "imgPath": f"{mid}.png" if image else "", "answer": world.qid(entity), "desc": desc}
        out.append(Mention(rec, cue, len(world.group_slots(group)), image))
    return out


def ceilings_of(mentions: list[Mention], n: int, kb_images: bool) -> dict[str, float]:
    """Expected H@1 of the ideal text-only, image-only and two-modality models on these mentions."""
    text = image = both = 0.0
    real = [m for m in mentions if m.cue != "x"]
    for m in real:
        t = 1.0 if m.cue in "tnb" else 1.0 / m.group_size
        if kb_images:
            i = 1.0 if m.cue in "ib" else (1.0 / m.group_size if m.cue == "t" else 1.0 / n)
            b = 1.0
        else:
            i, b = 1.0 / n, t
        text, image, both = text + t, image + i, both + b
    k = max(1, len(real))
    return {"text_only": text / k, "image_only": image / k, "both": both / k}


def designed_ceilings(s: SyntheticSettings) -> dict[str, float]:
    """The analytic ceilings of the package docstring, from the knobs (non-nil mentions, gold uniform over the KB)."""
    n, g = s.num_entities, s.group_size
    a = num_multi_groups(s) * g / n
    t, i = s.text_cue_rate, s.image_cue_rate
    b, m = 1.0 - t - i, s.missing_image_rate
    text = 1.0 - a * i * (1.0 - 1.0 / g)
    if not s.kb_images:
        return {"text_only": text, "image_only": 1.0 / n, "both": text}
    image = i + b + t * ((1.0 - m) * (a / g + 1.0 - a) + m / n)
    return {"text_only": text, "image_only": image, "both": 1.0}

