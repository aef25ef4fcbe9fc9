"""MMoE model = CLIP encoder + matcher, with the batch layout the data loaders produce.

A batch (mentions or entities) is a mapping with
  input_ids [B, Lt] long, attention_mask [B, Lt], pixel_values [B, 3, S, S] float,
  image_mask [B] bool (False: the input has no image; its pixel row is ignored).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from model.config import Config, ModelConfig
from model.encoder import ClipEncoder, load_clip
from moe.features import Features, SideCache
from moe.matcher import MMoEMatcher
from moe.units import MoELog

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_mask")


class MMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.matcher
        self.encoder = ClipEncoder(load_clip(cfg.clip_path, cfg.tiny_clip), s.text_dim, s.image_dim,
                                   zero_pixels_for_missing=s.published)
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


class ModelSetupError(ValueError):
    """The tokenizer and the model do not fit together; the message says what to do."""


def build_model(cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[MMoEModel, Config]:
    """Build the model; a tiny CLIP takes its vocabulary size and special tokens from the
    tokenizer. Returns the config with those values filled in (save that one)."""
    cfg = copy.deepcopy(cfg)
    tiny = cfg.model.tiny_clip
    if not cfg.model.clip_path and tokenizer is not None:
        if tiny.vocab_size <= 0:
            tiny.vocab_size = len(tokenizer)
        # A BERT-style tokenizer has [CLS]/[SEP] instead of bos/eos; the encoder pools at the last real
        # token, so a [SEP] that is both the separator and the eos is fine.
        fallback = {"bos": "cls", "eos": "sep", "pad": None}
        for name in ("bos", "eos", "pad"):
            attr = f"{name}_token_id"
            if getattr(tiny, attr) < 0:
                value = getattr(tokenizer, attr)
                if value is None and fallback[name]:
                    value = getattr(tokenizer, f"{fallback[name]}_token_id", None)
                if value is None:
                    alt = f" (or {fallback[name]})" if fallback[name] else ""
                    raise ModelSetupError(
                        f"the tokenizer has no {name}{alt} token, which the tiny CLIP needs: set {name}_token in its "
                        "tokenizer_config.json, set model.tiny_clip." + attr + ", or build a word-level tokenizer "
                        "from the dataset with python -m data_shards.tokenizer --root DATASET --out DATASET/tokenizer")
                setattr(tiny, attr, value)
    model = MMoEModel(cfg.model)
    vocab = model.encoder.clip.config.text_config.vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ModelSetupError(f"the tokenizer has {len(tokenizer)} tokens but the CLIP text model only {vocab}: use the "
                         "tokenizer the CLIP was trained with (data.tokenizer), or leave model.clip_path empty")
    return model, cfg
