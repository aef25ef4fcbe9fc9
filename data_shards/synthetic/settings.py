"""The generator's knobs (``SyntheticSettings``) and the named presets (``tiny``, ``demo``, ``large``, ``million``).

What each knob shapes is described in the package docstring (``data_shards.synthetic``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_shards.synthetic.images import NUM_SIGNATURES
from data_shards.synthetic.texts import TOPIC_WORDS


@dataclass
class SyntheticSettings:
    """Every knob of the generator (see the package docstring for what each one shapes)."""

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
    # KB-only entities appended after the world's (world.ExtraEntities): the same mentions against a larger KB.
    extra_entities: int = 0
    quoted_name_rate: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError on a knob out of its range."""
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
        if self.extra_entities < 0:
            raise ValueError("extra_entities must be >= 0")
        if self.max_images_per_entity < 1:
            raise ValueError("max_images_per_entity must be >= 1")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_entities=200, num_train=300, num_dev=60, num_test=60, image_size=32, max_images_per_entity=2),
    "demo": dict(num_entities=2000, num_train=6000, num_dev=600, num_test=600),
    "large": dict(num_entities=100_000, num_train=20_000, num_dev=2000, num_test=5000, image_size=32, max_images_per_entity=2),
    "million": dict(num_entities=1_000_000, num_train=3000, num_dev=500, num_test=2000, image_size=32, max_images_per_entity=1),
}


def preset(name: str, **overrides: Any) -> SyntheticSettings:
    """Settings of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return SyntheticSettings(**{**PRESETS[name], **overrides})
