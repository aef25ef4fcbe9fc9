"""A seeded synthetic multimodal entity linking (MEL) benchmark, written in the MIMIC on-disk format.

``python -m data_shards.synthetic --out DIR [--preset tiny|demo|large|million] [--seed N] [--set key=value ...]``
or ``generate(out_dir, SyntheticSettings(...))``. The same settings and seed give byte-identical files
(whatever the number of worker processes). The dataset is built in a temporary folder beside DIR and
renamed at the end, so a crash never leaves a half-written dataset under DIR.

Files (the layout of the real datasets, DESIGN.md section 4, read by ``data_shards.reader``)::

    kb_entity.json              [{"id", "qid", "entity_name", "desc", "image_list", "type": "entity"}, ...] (id order)
    qid2id.json                 one line: {"Q...": id, ...}
    SyntheticMEL_{train,dev,test}.json   [{"id", "sentence", "mentions", "entities", "imgPath", "answer", "desc"}, ...]
    kb_image/e<id>_<k>.jpg, mention_image/synth-<split>-<n>.jpg
    candidates.jsonl            the description table of the DME step: {"qid", "label", "aliases", "description"}
    tokenizer/                  word-level Hugging Face tokenizer of the whole vocabulary (AutoTokenizer loads it)
    generation.json             settings, seed, counts, the designed and realised ceilings, the hidden cue of each mention

Design: ambiguity that only both modalities together resolve.

* Entities come in *name groups*. A share ``ambiguity`` of the entities sits in groups of ``group_size``
  entities sharing one surface name (a procedurally generated two-word pseudo-name, "Kalo Mirezu"); the
  others have a name of their own. Names are distinct across groups. Quoting (``urllib.parse.quote``,
  spaces become %20) is decided per name group (``quoted_name_rate`` of them), so the surface form never
  tells group members apart.
* Each entity of a group has a distinct *topic word* (text cue: "painter", "river", ...) and a distinct
  *visual signature* (one of 8 shapes x 8 colours). Each group has a *background*: a 4x4 grid whose 12
  border cells encode the group index through a bijection (6 colours), so an image also identifies its group.
* Entity description: "<name> is a <adj> <topic> from <region> , active since <year> ." Entity images
  (1..max_images_per_entity): the signature on the group background, with position, size and rotation
  jitter and Gaussian pixel noise, all scaled by ``image_noise``.
* Mentions pick a gold entity uniformly over the KB (with replacement, independently per split, so
  splits share entities like the real data; stratified so that each split holds ambiguous golds in the
  KB's proportion) and a cue type, in exact proportions within each stratum:
  ``text`` (share ``text_cue_rate``): the sentence contains the gold's topic word; the image shows only
  the group background, and a share ``missing_image_rate`` of these mentions has no image at all;
  ``image`` (share ``image_cue_rate``): the sentence holds the name and generic filler words only (no
  topic word of any entity); the image shows the gold's signature on the group background;
  ``both`` (the rest): topic word in the sentence and signature in the image.
  A share ``nil_rate`` of mentions names an entity outside the KB (``"answer": "nil"``).
* Mention ``desc`` simulates the DME step honestly: among the candidates.jsonl rows labelled with the
  mention's name (every KB entity of the name group plus 0-2 distractor rows whose QIDs are not in the
  KB and whose topics belong to no group member), it is the gold's description when the sentence holds
  the gold's topic word, else the description of a uniformly random row. It never tells more than the
  sentence.

Designed ceilings (expected Hits@1 of ideal models, over non-nil mentions; ``a`` = share of entities in
multi-entity groups, ``g`` = group_size, ``t``/``i``/``b`` = text/image/both cue shares, ``m`` =
missing_image_rate, ``N`` = KB size):

* text-only (name + sentence + desc): resolves text and both cues, guesses among the name group
  otherwise: ``1 - a * i * (1 - 1/g)``;
* image-only (mention image vs entity images): resolves image and both cues; a background-only image
  finds the group and guesses in it; with no image it guesses among all N entities:
  ``i + b + t * ((1 - m) * (a/g + 1 - a) + m/N)``;
* both modalities: 1.0.

With the defaults (a = 0.8, g = 4, t = i = 0.45, m = 0.3, N = 2000): text-only 0.730, image-only 0.676,
both 1.0. With ``kb_images`` false the entities have no images: image-only falls to 1/N and "both" to
the text-only ceiling. generation.json also holds the ceilings realised on each generated split,
computed from the hidden cue string of each split (``t`` text cue with a background image, ``n`` text
cue without image, ``i`` image cue, ``b`` both, ``x`` nil).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import string
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_shards.tokenizer import write_word_tokenizer

PREFIX = "SyntheticMEL"
SPLITS = ("train", "dev", "test")
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Vocabulary. Topic words are the text cues; the filler lists never hold a topic word.

TOPIC_WORDS = (
    "painter sculptor poet novelist composer pianist violinist singer drummer guitarist actor dancer director "
    "architect photographer journalist historian philosopher mathematician physicist chemist biologist astronomer "
    "geologist botanist economist lawyer judge senator governor diplomat general admiral soldier pilot sailor "
    "explorer inventor engineer surgeon nurse pharmacist teacher librarian priest monk bishop rabbi footballer "
    "cricketer boxer wrestler swimmer cyclist sprinter skier golfer jockey goalkeeper coach referee chef baker "
    "farmer fisherman blacksmith carpenter tailor merchant banker publisher editor cartoonist comedian magician "
    "rapper river mountain lake island volcano glacier desert forest valley canyon waterfall village town city "
    "castle cathedral church temple mosque monastery bridge tower lighthouse airport railway highway canal dam "
    "museum university school hospital prison palace fortress stadium theatre cinema band orchestra choir club "
    "company newspaper magazine party army navy airline brewery bakery album song film novel opera ballet "
    "painting statue poem symphony sitcom documentary game horse dog cat eagle falcon whale dolphin shark tiger "
    "lion wolf bear snake beetle butterfly orchid rose oak cactus mushroom ship submarine locomotive car truck "
    "rocket satellite telescope computer robot language dialect festival battle treaty storm hurricane earthquake "
    "comet asteroid planet galaxy mineral crystal dish cheese wine beer sauce dessert typeface software algorithm "
    "protein gene disease virus vaccine medicine currency coin stamp flag anthem dynasty empire kingdom province "
    "county district municipality park garden zoo farm mine quarry cave reef peninsula bay strait cape plateau "
    "hill swamp"
).split()
WHEN_WORDS = "yesterday today recently earlier tonight again lately once twice afterwards".split()
VERB_WORDS = "visited opened left praised toured greeted entered crossed passed reached".split()
PLACE_WORDS = "market station square harbour plaza hall courtyard terrace gate avenue corner crossroads".split()
ADJ_WORDS = "famous renowned little obscure celebrated early modern ancient notable popular historic young old major".split()
YEARS = [str(y) for y in range(1850, 2020)]

# Sentence templates. {name}, {topic}, {when}, {verb}, {place}, {adj}, {an} ("a"/"an" before {adj}).
TEXT_TEMPLATES = (
    "{When}, the {topic} {name} {verb} the {place}.",
    "{name}, {an} {adj} {topic}, {verb} the {place} {when}.",
    "Photo: {name} ({topic}) at the {place}.",
    "The {place} was {verb} by {name}, the {topic}, {when}.",
    "Here the {topic} {name} is seen near the {place}.",
)
IMAGE_TEMPLATES = (
    "{When}, {name} {verb} the {place}.",
    "{name} at the {place} {when}.",
    "A picture of {name} near the {place}.",
    "{name} was seen at the {place} {when}.",
    "Photo: {name} in this picture, {when}.",
)
DESC_TEMPLATE = "{name} is {an} {adj} {topic} from {region}, active since {year}."
CAND_TEMPLATE = "{adj} {topic} from {region}"

_TEMPLATE_WORDS = sorted(
    {w.lower() for t in (*TEXT_TEMPLATES, *IMAGE_TEMPLATES, DESC_TEMPLATE, CAND_TEMPLATE)
     for w in re.findall(r"\w+", re.sub(r"\{\w+\}", " ", t))} | {"a", "an"}
)
_FIXED_WORDS = set(TOPIC_WORDS) | set(WHEN_WORDS) | set(VERB_WORDS) | set(PLACE_WORDS) | set(ADJ_WORDS) | set(_TEMPLATE_WORDS)
assert len(set(TOPIC_WORDS)) == len(TOPIC_WORDS)
assert not set(TOPIC_WORDS) & (_FIXED_WORDS - set(TOPIC_WORDS) - set(ADJ_WORDS)), "a filler word is a topic word"
assert not set(TOPIC_WORDS) & set(ADJ_WORDS)

# Pseudo-words: consonant-vowel syllables, sometimes a final consonant.
_ONSETS = "b d f g k l m n p r s t v z ch sh th br tr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "", "n", "r", "l", "s"]

# Images.
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "bar")
SIGNATURE_COLOURS = np.array(
    [(220, 30, 30), (30, 170, 40), (30, 60, 225), (240, 210, 20),
     (200, 40, 200), (20, 200, 210), (245, 130, 20), (250, 250, 250)],
    dtype=np.uint8,
)
BACKGROUND_COLOURS = np.array(
    [(40, 50, 100), (100, 110, 40), (110, 40, 55), (30, 105, 105), (128, 128, 128), (190, 165, 125), (70, 70, 70)],
    dtype=np.float32,
)  # the first 6 encode the group; the last fills the centre cells
_BG_BASE = 6
_BORDER_CELLS = [(r, c) for r in range(4) for c in range(4) if r in (0, 3) or c in (0, 3)]  # 12 cells
_BG_CODES = _BG_BASE ** len(_BORDER_CELLS)
NUM_SIGNATURES = len(SHAPES) * len(SIGNATURE_COLOURS)


# ----------------------------------------------------------------------------------------------
# Settings and presets.


@dataclass
class SyntheticSettings:
    """Every knob of the generator (see the module docstring for what each one shapes)."""

    num_entities: int = 2000
    group_size: int = 4  # entities sharing one name in a multi-entity group
    ambiguity: float = 0.8  # share of entities in multi-entity groups
    num_train: int = 6000
    num_dev: int = 600
    num_test: int = 600
    text_cue_rate: float = 0.45
    image_cue_rate: float = 0.45  # the rest of the mentions have both cues
    missing_image_rate: float = 0.3  # share of text-cue mentions without any image
    image_noise: float = 0.3  # jitter and pixel noise, 0 = clean
    image_size: int = 64
    kb_images: bool = True  # false: every entity has an empty image_list
    max_images_per_entity: int = 3
    nil_rate: float = 0.01
    quoted_name_rate: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        if self.num_entities < 1:
            raise ValueError("num_entities must be >= 1")
        if not 1 <= self.group_size <= min(len(TOPIC_WORDS), NUM_SIGNATURES):
            raise ValueError(f"group_size must lie in 1..{min(len(TOPIC_WORDS), NUM_SIGNATURES)}")
        for key in ("ambiguity", "text_cue_rate", "image_cue_rate", "missing_image_rate", "image_noise", "nil_rate",
                    "quoted_name_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must lie in [0, 1], got {getattr(self, key)}")
        if self.text_cue_rate + self.image_cue_rate > 1.0 + 1e-9:
            raise ValueError("text_cue_rate + image_cue_rate must be <= 1")
        if min(self.num_train, self.num_dev, self.num_test) < 0:
            raise ValueError("split sizes must be >= 0")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")
        if self.max_images_per_entity < 1:
            raise ValueError("max_images_per_entity must be >= 1")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_entities=200, num_train=300, num_dev=60, num_test=60, image_size=32, max_images_per_entity=2),
    "demo": dict(num_entities=2000, num_train=6000, num_dev=600, num_test=600),
    "large": dict(num_entities=100_000, num_train=20_000, num_dev=2000, num_test=5000, image_size=32, max_images_per_entity=2),
    "million": dict(num_entities=1_000_000, num_train=3000, num_dev=500, num_test=2000, kb_images=False, image_size=32),
}


def preset(name: str, **overrides: Any) -> SyntheticSettings:
    """Settings of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return SyntheticSettings(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------
# Small deterministic helpers.


def _coprime_multiplier(rng: np.random.Generator, modulus: int) -> int:
    a = int(rng.integers(modulus // 3, modulus)) | 1
    while math.gcd(a, modulus) != 1:
        a += 2
    return a


def _pseudo_words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    """`count` distinct pseudo-words (2-3 syllables), none in `taken` (which gets them added)."""
    out: list[str] = []
    while len(out) < count:
        n = max(64, 2 * (count - len(out)))
        syl = rng.integers(2, 4, n)
        ons = rng.integers(0, len(_ONSETS), (n, 3))
        vow = rng.integers(0, len(_VOWELS), (n, 3))
        cod = rng.integers(0, len(_CODAS), n)
        for k in range(n):
            w = "".join(_ONSETS[ons[k, j]] + _VOWELS[vow[k, j]] for j in range(syl[k])) + _CODAS[cod[k]]
            if w not in taken:
                taken.add(w)
                out.append(w)
                if len(out) == count:
                    break
    return out


def _distinct_rows(rng: np.random.Generator, rows: int, cols: int, high: int) -> np.ndarray:
    """[rows, cols] integers in [0, high) with distinct values within each row."""
    if cols * cols > high:  # collisions likely: partial random permutations, in blocks of rows
        block = max(1, (1 << 20) // high)
        return np.concatenate([rng.random((min(block, rows - r), high)).argsort(axis=1)[:, :cols]
                               for r in range(0, rows, block)] or [np.zeros((0, cols), dtype=np.int64)])
    out = rng.integers(0, high, (rows, cols))  # rejection sampling of the rows with a repeat
    if cols < 2:
        return out
    while True:
        s = np.sort(out, axis=1)
        bad = np.nonzero((s[:, 1:] == s[:, :-1]).any(axis=1))[0]
        if bad.size == 0:
            return out
        out[bad] = rng.integers(0, high, (bad.size, cols))


def _num_multi_groups(s: SyntheticSettings) -> int:
    return int(round(s.ambiguity * s.num_entities)) // s.group_size if s.group_size >= 2 else 0


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class _World:
    """Everything about the KB, as arrays (bounded memory: a few tens of bytes per entity)."""

    s: SyntheticSettings
    n: int
    num_multi: int  # multi-entity groups, indices 0..num_multi-1; the rest are singletons
    num_groups: int
    slot_entity: np.ndarray  # [N] entity id at each slot; slots of a group are contiguous
    entity_slot: np.ndarray  # [N]
    topic: np.ndarray  # [N] by slot
    signature: np.ndarray  # [N] by slot: shape * 8 + colour
    region: np.ndarray  # [N] by slot
    adj: np.ndarray  # [N] by slot
    year: np.ndarray  # [N] by slot
    n_images: np.ndarray  # [N] by slot (0 when kb_images is false)
    quoted: np.ndarray  # [G] bool
    n_distractors: np.ndarray  # [G]
    distractor_offset: np.ndarray  # [G] index of the group's first distractor QID
    distractor_topic: np.ndarray  # [G, 2]
    distractor_region: np.ndarray  # [G, 2]
    distractor_adj: np.ndarray  # [G, 2]
    distractor_pos: np.ndarray  # [G, 2] insertion positions among the group's candidate rows
    given: list[str]
    family: list[str]
    regions: list[str]
    name_mod: int
    name_mul: int
    name_add: int
    qid_numbers: np.ndarray  # [N + distractors] distinct random numbers: entity e has Q<qid_numbers[e]>
    bg_mul: int
    bg_add: int

    # --- groups
    def group_of_slot(self, slot: int) -> int:
        g = self.s.group_size
        multi = self.num_multi * g
        return slot // g if slot < multi else self.num_multi + slot - multi

    def group_slots(self, group: int) -> range:
        g = self.s.group_size
        if group < self.num_multi:
            return range(group * g, group * g + g)
        start = self.num_multi * g + group - self.num_multi
        return range(start, start + 1)

    # --- names, QIDs, backgrounds (bijections, so no table is needed)
    def name(self, name_index: int) -> str:
        code = (self.name_mul * name_index + self.name_add) % self.name_mod
        i, j = divmod(code, len(self.family))
        return f"{self.given[i].capitalize()} {self.family[j].capitalize()}"

    def surface(self, group: int) -> str:
        name = self.name(group)
        return quote(name) if self.quoted[group] else name

    def qid(self, index: int) -> str:
        """Entity `index` < N; distractor d has index N + d."""
        return f"Q{self.qid_numbers[index]}"

    def background(self, group: int) -> int:
        return (self.bg_mul * group + self.bg_add) % _BG_CODES

    # --- descriptions
    def cand_desc(self, slot: int) -> str:
        return CAND_TEMPLATE.format(adj=ADJ_WORDS[self.adj[slot]], topic=TOPIC_WORDS[self.topic[slot]],
                                    region=self.regions[self.region[slot]])

    def distractor_desc(self, group: int, j: int) -> str:
        return CAND_TEMPLATE.format(adj=ADJ_WORDS[self.distractor_adj[group, j]],
                                    topic=TOPIC_WORDS[self.distractor_topic[group, j]],
                                    region=self.regions[self.distractor_region[group, j]])

    def entity_desc(self, slot: int, name: str) -> str:
        adj = ADJ_WORDS[self.adj[slot]]
        return DESC_TEMPLATE.format(name=name, an=_article(adj), adj=adj, topic=TOPIC_WORDS[self.topic[slot]],
                                    region=self.regions[self.region[slot]], year=YEARS[self.year[slot]])

    def candidate_rows(self, group: int) -> list[dict[str, Any]]:
        """The candidates.jsonl rows labelled with this group's name (KB members and distractors)."""
        name = self.name(group)
        given, family = name.split(" ")
        aliases = [family, f"{given[0]}. {family}"]
        rows = [{"qid": self.qid(int(self.slot_entity[s])), "label": name, "aliases": aliases, "description": self.cand_desc(s)}
                for s in self.group_slots(group)]
        for j in range(int(self.n_distractors[group])):
            row = {"qid": self.qid(self.n + int(self.distractor_offset[group]) + j), "label": name, "aliases": aliases,
                   "description": self.distractor_desc(group, j)}
            rows.insert(int(self.distractor_pos[group, j]) % (len(rows) + 1), row)
        return rows

    def image_names(self, entity: int) -> list[str]:
        return [f"e{entity}_{k}.jpg" for k in range(int(self.n_images[self.entity_slot[entity]]))]


def _build_world(s: SyntheticSettings, num_nil_names: int) -> _World:
    rng = np.random.default_rng([s.seed, 0])
    n, g = s.num_entities, s.group_size
    num_multi = _num_multi_groups(s)
    num_groups = n - num_multi * g + num_multi
    slot_entity = rng.permutation(n)
    entity_slot = np.empty(n, dtype=np.int64)
    entity_slot[slot_entity] = np.arange(n)

    # Topics and signatures: distinct within a multi-entity group.
    topic = rng.integers(0, len(TOPIC_WORDS), n).astype(np.int16)
    signature = rng.integers(0, NUM_SIGNATURES, n).astype(np.int16)
    if num_multi:
        topic[: num_multi * g] = _distinct_rows(rng, num_multi, g, len(TOPIC_WORDS)).reshape(-1)
        signature[: num_multi * g] = _distinct_rows(rng, num_multi, g, NUM_SIGNATURES).reshape(-1)
    taken = set(_FIXED_WORDS)
    num_names = num_groups + num_nil_names
    width = math.isqrt(int(1.3 * num_names)) + 8
    given = _pseudo_words(rng, width, taken)
    family = _pseudo_words(rng, width, taken)
    regions = [w.capitalize() for w in _pseudo_words(rng, 64, taken)]
    region = rng.integers(0, len(regions), n).astype(np.int16)
    adj = rng.integers(0, len(ADJ_WORDS), n).astype(np.int8)
    year = rng.integers(0, len(YEARS), n).astype(np.int16)
    if s.kb_images:
        n_images = rng.integers(1, s.max_images_per_entity + 1, n).astype(np.int8)
    else:
        n_images = np.zeros(n, dtype=np.int8)

    quoted = rng.random(num_groups) < s.quoted_name_rate
    n_distractors = rng.integers(0, 3, num_groups).astype(np.int8)
    distractor_offset = np.concatenate([[0], np.cumsum(n_distractors[:-1], dtype=np.int64)])
    # Distractor topics never equal a topic of the group's members.
    dis_topic = rng.integers(0, len(TOPIC_WORDS), (num_groups, 2)).astype(np.int16)
    member_topics = np.full((num_groups, g), -1, dtype=np.int16)
    member_topics[:num_multi] = topic[: num_multi * g].reshape(num_multi, g)
    member_topics[num_multi:, 0] = topic[num_multi * g:]
    while True:
        clash = (dis_topic[:, :, None] == member_topics[:, None, :]).any(axis=2)
        if not clash.any():
            break
        dis_topic[clash] = rng.integers(0, len(TOPIC_WORDS), int(clash.sum()))
    del member_topics
    dis_region = rng.integers(0, len(regions), (num_groups, 2)).astype(np.int16)
    dis_adj = rng.integers(0, len(ADJ_WORDS), (num_groups, 2)).astype(np.int8)
    dis_pos = rng.integers(0, g + 3, (num_groups, 2)).astype(np.int8)

    name_mod = len(given) * len(family)
    total_qids = n + int(n_distractors.sum())
    # Distinct QID numbers, sparse in their range (Floyd's sampling: memory ~ total_qids, not the range).
    qid_range = 10 ** len(str(50 * total_qids))
    qid_numbers = rng.choice(qid_range - 1, total_qids, replace=False) + 1
    return _World(
        s=s, n=n, num_multi=num_multi, num_groups=num_groups, slot_entity=slot_entity, entity_slot=entity_slot, topic=topic,
        signature=signature, region=region, adj=adj, year=year, n_images=n_images, quoted=quoted, n_distractors=n_distractors,
        distractor_offset=distractor_offset, distractor_topic=dis_topic, distractor_region=dis_region, distractor_adj=dis_adj,
        distractor_pos=dis_pos, given=given, family=family, regions=regions, name_mod=name_mod,
        name_mul=_coprime_multiplier(rng, name_mod), name_add=int(rng.integers(0, name_mod)), qid_numbers=qid_numbers,
        bg_mul=_coprime_multiplier(rng, _BG_CODES), bg_add=int(rng.integers(0, _BG_CODES)),
    )


# ----------------------------------------------------------------------------------------------
# Images.


def _shape_points(shape: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "bar":
        pts = [(-1.0, -0.38), (1.0, -0.38), (1.0, 0.38), (-1.0, 0.38)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + 2 * math.pi * k / 3 for k in range(3))]
    elif shape == "hexagon":
        pts = [(math.cos(2 * math.pi * k / 6), math.sin(2 * math.pi * k / 6)) for k in range(6)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + math.pi * k / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + math.pi * k / 5)) for k in range(10)]
    elif shape == "cross":
        w = 0.35
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    else:
        raise ValueError(shape)
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render_image(size: int, noise: float, background: int, signature: int, seed: Iterable[int]) -> Image.Image:
    """The group background (code `background`), with signature `signature` drawn on it (-1: none)."""
    rng = np.random.default_rng(list(seed))
    grid = np.full((4, 4), len(BACKGROUND_COLOURS) - 1, dtype=np.int64)
    code = background
    for r, c in _BORDER_CELLS:
        code, grid[r, c] = divmod(code, _BG_BASE)
    cell = (np.arange(size) * 4) // size
    pixels = BACKGROUND_COLOURS[grid[cell[:, None], cell[None, :]]]
    img = Image.fromarray(pixels.astype(np.uint8))
    if signature >= 0:
        shape = SHAPES[signature // len(SIGNATURE_COLOURS)]
        colour = tuple(int(v) for v in SIGNATURE_COLOURS[signature % len(SIGNATURE_COLOURS)])
        jx, jy, js, jr = rng.uniform(-1.0, 1.0, 4)
        cx = size / 2 + jx * noise * 0.15 * size
        cy = size / 2 + jy * noise * 0.15 * size
        r = size * 0.28 * (1 + js * noise * 0.2)
        theta = jr * noise * math.pi / 6
        draw = ImageDraw.Draw(img)
        line = max(1, size // 32)
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(0, 0, 0), width=line)
        elif shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r * 0.4)))
        else:
            draw.polygon(_shape_points(shape, cx, cy, r, theta), fill=colour, outline=(0, 0, 0), width=line)
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 30.0 * noise, (size, size, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img


def _write_images(tasks: list[tuple[str, int, float, int, int, tuple[int, ...]]]) -> int:
    for path, size, noise, background, signature, seed in tasks:
        render_image(size, noise, background, signature, seed).save(path, format="JPEG", quality=90)
    return len(tasks)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part


# ----------------------------------------------------------------------------------------------
# Mentions.


@dataclass
class _Mention:
    record: dict[str, Any]
    cue: str  # t, n, i, b, x (see the module docstring)
    group_size: int  # entities sharing the mention's name (0 for nil)
    image_task: tuple[int, int] | None  # (background, signature) of the mention image


def _fill(template: str, name: str, topic: str, rng_vals: tuple[int, int, int, int]) -> str:
    when, verb, place, adj = rng_vals
    adj_w = ADJ_WORDS[adj]
    when_w = WHEN_WORDS[when]
    return template.format(name=name, topic=topic, when=when_w, When=when_w.capitalize(), verb=VERB_WORDS[verb],
                           place=PLACE_WORDS[place], adj=adj_w, an=_article(adj_w))


def _make_split(world: _World, split_index: int, split: str, count: int, nil_name_base: int) -> list[_Mention]:
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
    out: list[_Mention] = []
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
            rec = {"id": mid, "sentence": _fill(TEXT_TEMPLATES[tmpl[k]], name, topic, vals), "mentions": name,
                   "entities": name, "imgPath": f"{mid}.png" if image else "", "answer": "nil", "desc": desc}
            out.append(_Mention(rec, "x", 0, image))
            continue
        cue = str(cues[real])
        entity = int(gold[real])
        real += 1
        slot = int(world.entity_slot[entity])
        group = world.group_of_slot(slot)
        name = world.name(group)
        topic = TOPIC_WORDS[world.topic[slot]]
        if cue == "i":
            sentence = _fill(IMAGE_TEMPLATES[tmpl[k]], name, "", vals)
        else:
            sentence = _fill(TEXT_TEMPLATES[tmpl[k]], name, topic, vals)
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
        out.append(_Mention(rec, cue, len(world.group_slots(group)), image))
    return out


def _ceilings_of(mentions: list[_Mention], n: int, kb_images: bool) -> dict[str, float]:
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
    """The analytic ceilings of the module docstring, from the knobs (non-nil mentions, gold uniform over the KB)."""
    n, g = s.num_entities, s.group_size
    a = _num_multi_groups(s) * g / n
    t, i = s.text_cue_rate, s.image_cue_rate
    b, m = 1.0 - t - i, s.missing_image_rate
    text = 1.0 - a * i * (1.0 - 1.0 / g)
    if not s.kb_images:
        return {"text_only": text, "image_only": 1.0 / n, "both": text}
    image = i + b + t * ((1.0 - m) * (a / g + 1.0 - a) + m / n)
    return {"text_only": text, "image_only": image, "both": 1.0}


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def _vocabulary(world: _World) -> list[str]:
    words = set(_FIXED_WORDS) | set(YEARS) | set(string.ascii_lowercase) | set(string.digits) | set(string.punctuation)
    words |= set(world.given) | set(world.family) | {r.lower() for r in world.regions}
    return sorted(words)


def write_tokenizer(out_dir: Path, words: list[str]) -> int:
    """A word-level tokenizer: pad 0, unk 1, [SEP] 2, words, then bos and eos as the last two ids (CLIP's order).
    The writer is data_shards.tokenizer's, which also builds one from any dataset."""
    return write_word_tokenizer(out_dir, words)


# ----------------------------------------------------------------------------------------------
# Writers (streamed).


def _write_kb(world: _World, root: Path, progress: bool) -> None:
    chunk = 4096
    with open(root / "kb_entity.json", "w", encoding="utf-8") as kb, open(root / "qid2id.json", "w", encoding="utf-8") as q2i, \
            tqdm(total=world.n, desc="kb entities", unit="ent", disable=not progress) as bar:
        kb.write("[")
        q2i.write("{")
        for start in range(0, world.n, chunk):
            kb_parts, q_parts = [], []
            for e in range(start, min(world.n, start + chunk)):
                slot = int(world.entity_slot[e])
                group = world.group_of_slot(slot)
                name = world.name(group)
                qid = world.qid(e)
                rec = {"id": e, "qid": qid, "entity_name": world.surface(group), "desc": world.entity_desc(slot, name),
                       "image_list": world.image_names(e), "type": "entity"}
                kb_parts.append(json.dumps(rec, ensure_ascii=False))
                q_parts.append(f"{json.dumps(qid)}: {e}")
            sep = ",\n" if start else ""
            kb.write(sep + ",\n".join(kb_parts))
            q2i.write((", " if start else "") + ", ".join(q_parts))
            bar.update(len(kb_parts))
        kb.write("]\n")
        q2i.write("}\n")


def _write_candidates(world: _World, root: Path, progress: bool) -> int:
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


def _image_tasks(world: _World, root: Path, splits: dict[str, list[_Mention]]) -> Iterator[tuple]:
    """(path, size, noise, background, signature, seed) of every image, generated lazily."""
    s = world.s
    if s.kb_images:
        kb_dir = root / "kb_image"
        for e in range(world.n):
            slot = int(world.entity_slot[e])
            bg, sig = world.background(world.group_of_slot(slot)), int(world.signature[slot])
            for k, name in enumerate(world.image_names(e)):
                yield (str(kb_dir / name), s.image_size, s.image_noise, bg, sig, (s.seed, 1, e, k))
    m_dir = root / "mention_image"
    for si, split in enumerate(SPLITS):
        for k, m in enumerate(splits[split]):
            if m.image_task is not None:
                stem = Path(m.record["imgPath"]).stem
                yield (str(m_dir / f"{stem}.jpg"), s.image_size, s.image_noise, *m.image_task, (s.seed, 2, si, k))


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
    counts = {"train": s.num_train, "dev": s.num_dev, "test": s.num_test}
    world = _build_world(s, num_nil_names=sum(counts.values()))
    nil_base = world.num_groups
    splits: dict[str, list[_Mention]] = {}
    for si, split in enumerate(SPLITS):
        splits[split] = _make_split(world, si, split, counts[split], nil_base)
        nil_base += counts[split]
    (root / "kb_image").mkdir()
    (root / "mention_image").mkdir()

    # Images go to worker processes while this one writes the JSON files.
    kb_images = int(world.n_images.sum())
    num_images = kb_images + sum(m.image_task is not None for ms in splits.values() for m in ms)
    tasks = _image_tasks(world, root, splits)
    chunk = 128
    pool = None
    if workers > 1 and num_images > 4 * chunk:
        pool = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)
        pending = pool.imap_unordered(_write_images, _chunks(tasks, chunk))
    try:
        _write_kb(world, root, progress)
        cand_rows = _write_candidates(world, root, progress)
        for split in tqdm(SPLITS, desc="splits", disable=not progress):
            with open(root / f"{PREFIX}_{split}.json", "w", encoding="utf-8") as fh:
                fh.write("[" + ",\n".join(json.dumps(m.record, ensure_ascii=False) for m in splits[split]) + "]\n")
        with tqdm(total=num_images, desc="images", unit="img", disable=not progress) as bar:
            if pool is not None:
                for done in pending:
                    bar.update(done)
            else:
                for part in _chunks(tasks, chunk):
                    bar.update(_write_images(part))
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    vocab_size = write_tokenizer(root / "tokenizer", _vocabulary(world))

    split_counts = {}
    for split, ms in splits.items():
        cues = "".join(m.cue for m in ms)
        real = [m for m in ms if m.cue != "x"]
        split_counts[split] = {
            "mentions": len(ms), "nil": cues.count("x"), "text_cue": cues.count("t") + cues.count("n"),
            "image_cue": cues.count("i"), "both_cues": cues.count("b"), "no_image": sum(m.image_task is None for m in ms),
            "ambiguous_share": sum(m.group_size > 1 for m in real) / max(1, len(real)),
        }
    summary = {
        "format_version": FORMAT_VERSION,
        "dataset": PREFIX,
        "seed": s.seed,
        "settings": dataclasses.asdict(s),
        "counts": {
            "entities": world.n, "name_groups": world.num_groups, "multi_entity_groups": world.num_multi,
            "ambiguous_entity_share": world.num_multi * s.group_size / world.n if s.group_size > 1 else 0.0,
            "quoted_name_groups": int(world.quoted.sum()), "candidate_rows": cand_rows,
            "distractor_rows": int(world.n_distractors.sum()), "kb_images": kb_images,
            "mention_images": num_images - kb_images, "vocab_size": vocab_size, "splits": split_counts,
        },
        "ceilings": {
            "designed": designed_ceilings(s),
            "realised": {split: _ceilings_of(ms, world.n, s.kb_images) for split, ms in splits.items()}
            | {"all": _ceilings_of([m for ms in splits.values() for m in ms], world.n, s.kb_images)},
        },
        "cues": {split: "".join(m.cue for m in ms) for split, ms in splits.items()},
        "cue_legend": {"t": "text cue, background-only image", "n": "text cue, no image", "i": "image cue",
                       "b": "both cues", "x": "nil"},
    }
    (root / "generation.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


# ----------------------------------------------------------------------------------------------
# CLI.


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
    parser = argparse.ArgumentParser(prog="python -m data_shards.synthetic", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
