"""The world of the synthetic benchmark: entities, their name groups, names, QIDs, text and visual cues.

Entities sit in *slots*; the slots of a name group are contiguous (multi-entity groups first, then
singletons). Each slot holds a topic word (the text cue), a visual signature (the image cue), a region,
an adjective, a year and an image count. Names, QIDs and group backgrounds come from bijections
(``World.name``, ``World.qid``, ``World.background``), so the world is a handful of arrays: a few tens
of bytes per entity, whatever the KB size. ``build_world`` draws it from the settings' seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from data_shards.synthetic.images import BG_CODES, NUM_SIGNATURES
from data_shards.synthetic.settings import SyntheticSettings
from data_shards.synthetic.texts import ADJ_WORDS, CAND_TEMPLATE, DESC_TEMPLATE, FIXED_WORDS, TOPIC_WORDS, YEARS, article

# Pseudo-words: consonant-vowel syllables, sometimes a final consonant.
_ONSETS = "b d f g k l m n p r s t v z ch sh th br tr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "", "n", "r", "l", "s"]


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


def num_multi_groups(s: SyntheticSettings) -> int:
    """How many name groups of `group_size` entities the settings ask for (the rest are singletons)."""
    return int(round(s.ambiguity * s.num_entities)) // s.group_size if s.group_size >= 2 else 0


@dataclass
class World:
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
        return self.name_of_code((self.name_mul * name_index + self.name_add) % self.name_mod)

    def name_of_code(self, code: int) -> str:
        """The name of one (given, family) pair, ``code`` in [0, name_mod)."""
        i, j = divmod(code, len(self.family))
        return f"{self.given[i].capitalize()} {self.family[j].capitalize()}"

    def surface(self, group: int) -> str:
        name = self.name(group)
        return quote(name) if self.quoted[group] else name

    def qid(self, index: int) -> str:
        """Entity `index` < N; distractor d has index N + d."""
        return f"Q{self.qid_numbers[index]}"

    def background(self, group: int) -> int:
        return (self.bg_mul * group + self.bg_add) % BG_CODES

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
        return DESC_TEMPLATE.format(name=name, an=article(adj), adj=adj, topic=TOPIC_WORDS[self.topic[slot]],
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


def build_world(s: SyntheticSettings, num_nil_names: int) -> World:
    """The world of these settings (seeded by ``[seed, 0]``), with names to spare for `num_nil_names` nil mentions."""
    rng = np.random.default_rng([s.seed, 0])
    n, g = s.num_entities, s.group_size
    num_multi = num_multi_groups(s)
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
    taken = set(FIXED_WORDS)
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
    return World(
        s=s, n=n, num_multi=num_multi, num_groups=num_groups, slot_entity=slot_entity, entity_slot=entity_slot, topic=topic,
        signature=signature, region=region, adj=adj, year=year, n_images=n_images, quoted=quoted, n_distractors=n_distractors,
        distractor_offset=distractor_offset, distractor_topic=dis_topic, distractor_region=dis_region, distractor_adj=dis_adj,
        distractor_pos=dis_pos, given=given, family=family, regions=regions, name_mod=name_mod,
        name_mul=_coprime_multiplier(rng, name_mod), name_add=int(rng.integers(0, name_mod)), qid_numbers=qid_numbers,
        bg_mul=_coprime_multiplier(rng, BG_CODES), bg_add=int(rng.integers(0, BG_CODES)),
    )



@dataclass
class ExtraEntities:
    """KB-only entities (``extra_entities``): ids N .. N+X-1, after the world's N, linked by no mention.

    Drawn from their own random stream (``[seed, 3]``) and from the world's own words (given and family
    names, topics, regions, adjectives, years; most names are some group's name), so the world, the splits
    and the tokenizer are exactly those of the same settings without them, whatever their number: the same
    mentions can be ranked against ever larger KBs (bench/bench_scale.py). Each has a random topic, signature
    and background, so a mention's cues still single out its gold, except where an extra entity happens to
    share its name and its cue."""

    n_world: int
    name_code: np.ndarray  # [X] (given, family) pair of the world's lists
    topic: np.ndarray
    region: np.ndarray
    adj: np.ndarray
    year: np.ndarray
    signature: np.ndarray
    background: np.ndarray
    n_images: np.ndarray  # [X] (0 when kb_images is false)
    qid_numbers: np.ndarray  # [X] distinct, above every world QID number

    def __len__(self) -> int:
        return len(self.name_code)

    def record(self, world: World, x: int) -> dict[str, Any]:
        """The kb_entity.json record of extra entity ``x`` (id N + x)."""
        name = world.name_of_code(int(self.name_code[x]))
        adj = ADJ_WORDS[self.adj[x]]
        desc = DESC_TEMPLATE.format(name=name, an=article(adj), adj=adj, topic=TOPIC_WORDS[self.topic[x]],
                                    region=world.regions[self.region[x]], year=YEARS[self.year[x]])
        return {"id": self.n_world + x, "qid": f"Q{self.qid_numbers[x]}", "entity_name": name, "desc": desc,
                "image_list": self.image_names(x), "type": "entity"}

    def image_names(self, x: int) -> list[str]:
        return [f"e{self.n_world + x}_{k}.jpg" for k in range(int(self.n_images[x]))]


def build_extras(s: SyntheticSettings, world: World) -> ExtraEntities:
    """The ``s.extra_entities`` KB-only entities of this world (seeded by ``[seed, 3]``)."""
    rng = np.random.default_rng([s.seed, 3])
    x = s.extra_entities
    n_images = (rng.integers(1, s.max_images_per_entity + 1, x) if s.kb_images else np.zeros(x)).astype(np.int8)
    base = 10 ** len(str(int(world.qid_numbers.max()) if len(world.qid_numbers) else 1))  # above every world QID
    return ExtraEntities(
        n_world=world.n, name_code=rng.integers(0, world.name_mod, x), topic=rng.integers(0, len(TOPIC_WORDS), x),
        region=rng.integers(0, len(world.regions), x), adj=rng.integers(0, len(ADJ_WORDS), x),
        year=rng.integers(0, len(YEARS), x), signature=rng.integers(0, NUM_SIGNATURES, x),
        background=rng.integers(0, BG_CODES, x), n_images=n_images,
        qid_numbers=base + rng.choice(10 ** len(str(50 * max(1, x))), x, replace=False),
    )
