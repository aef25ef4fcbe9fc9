"""A seeded synthetic multimodal entity linking (MEL) benchmark, written in the MIMIC on-disk format.

``python -m data_shards.synthetic --out DIR [--preset tiny|demo|large|million] [--seed N] [--set key=value ...]``
or ``generate(out_dir, SyntheticSettings(...))``. The same settings and seed give byte-identical files
(whatever the number of worker processes). The dataset is built in a temporary folder beside DIR and
renamed at the end, so a crash never leaves a half-written dataset under DIR.

Files (the MIMIC layout of the real datasets, read by ``data_shards.reader``; docs/data.md
describes it)::

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
* ``extra_entities`` (default 0) appends KB-only entities after the world's (ids N..N+X-1, their own random
  stream, the world's names and words; ``world.ExtraEntities``): the world, the splits and the tokenizer stay
  byte-identical, so the same mentions can be ranked against ever larger KBs (bench/bench_scale.py).
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

Modules, bottom to top: ``texts`` (vocabulary and templates), ``images`` (signatures, backgrounds,
drawing), ``settings`` (knobs and presets), ``world`` (entities, name groups, names, QIDs, cues),
``mentions`` (splits and ceilings), ``writers`` (the files), ``build`` (``generate``), ``cli``.
"""

from data_shards.synthetic.build import generate
from data_shards.synthetic.cli import main
from data_shards.synthetic.images import BACKGROUND_COLOURS, NUM_SIGNATURES, SHAPES, SIGNATURE_COLOURS, render_image
from data_shards.synthetic.mentions import designed_ceilings
from data_shards.synthetic.settings import PRESETS, SyntheticSettings, preset
from data_shards.synthetic.texts import TOPIC_WORDS
from data_shards.synthetic.writers import FORMAT_VERSION, PREFIX, SPLITS, write_tokenizer

__all__ = [
    "BACKGROUND_COLOURS", "FORMAT_VERSION", "NUM_SIGNATURES", "PREFIX", "PRESETS", "SHAPES", "SIGNATURE_COLOURS", "SPLITS",
    "TOPIC_WORDS", "SyntheticSettings", "designed_ceilings", "generate", "main", "preset", "render_image", "write_tokenizer",
]
