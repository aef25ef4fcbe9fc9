"""MMoE model = CLIP encoder + matcher, with the batch layout the data loaders produce.

A batch (mentions or entities) is a mapping with
  input_ids [B, Lt] long, attention_mask [B, Lt], pixel_values [B, 3, S, S] float,
  image_mask [B] bool (False: the input has no image; its pixel row is ignored).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from moe.features import Features, SideCache
from moe.matcher import MMoEMatcher
from moe.units import MoELog
from train.config import ModelConfig
from train.encoder import ClipEncoder, load_clip

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_mask")


class MMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.matcher
        self.encoder = ClipEncoder(load_clip(cfg.clip_path, cfg.tiny_clip), s.text_dim, s.image_dim)
        self.matcher = MMoEMatcher(s)

    def features(self, batch: Mapping[str, Tensor]) -> Features:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; a batch needs {BATCH_KEYS}")
        return self.encoder(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_mask"])

    def mention_side(self, batch: Mapping[str, Tensor]) -> tuple[SideCache, MoELog]:
        return self.matcher.mention_side(self.features(batch))

    def entity_side(self, batch: Mapping[str, Tensor]) -> tuple[SideCache, MoELog]:
        return self.matcher.entity_side(self.features(batch))

    def forward(self, mentions: Mapping[str, Tensor], entities: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], MoELog]:
        """Scores of every mention against every entity of the batch (gold entities first,
        then any extra negatives), per unit and overall, plus the MoE log of both sides."""
        m_side, m_log = self.mention_side(mentions)
        e_side, e_log = self.entity_side(entities)
        m_log.merge(e_log)
        return self.matcher.score(m_side, e_side), m_log
