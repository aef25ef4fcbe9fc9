"""MMoE model = encoder (one CLIP, or a text and a vision tower) + matcher, with the batch layout the data
loaders produce.

A batch (mentions or entities) is a mapping with
  input_ids [B, Lt] long, attention_mask [B, Lt], pixel_values [B, 3, S, S] float,
  image_mask [B] bool (False: the input has no image; its pixel row is ignored).
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from data_shards.collate import has_tokenizer, load_tokenizer
from model.config import CompileParts, Config, ModelConfig
from model.encoder import ClipEncoder, load_clip
from model.factory import text_model_folder
from model.towers import TowersEncoder
from moe.features import Features, SideCache
from moe.matcher import MMoEMatcher
from moe.units import MoELog

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_mask")


class MMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.matcher
        if cfg.encoder == "towers":
            self.encoder: ClipEncoder | TowersEncoder = TowersEncoder(cfg.towers, cfg.tiny_clip, s.text_dim, s.image_dim)
        else:
            self.encoder = ClipEncoder(load_clip(cfg.clip_path, cfg.tiny_clip), s.text_dim, s.image_dim,
                                       zero_pixels_for_missing=s.published)
        self.matcher = MMoEMatcher(s)

    def compile_parts(self, parts: str) -> None:
        """torch.compile the encoder's towers (``encoder``), the matcher's side and scoring (``matcher``), both
        (``all``) or nothing (``none``), in place: parameters and state-dict keys stay as they are (train.compile)."""
        choices = typing.get_args(CompileParts)
        if parts not in choices:
            raise ValueError(f"compile parts must be one of {choices}, got {parts!r}")
        if parts in ("encoder", "all"):
            self.encoder.compile_towers()
        if parts in ("matcher", "all"):
            self.matcher.compile_sides()

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
    """Build the model; a random-init text encoder (tiny CLIP or tower) takes its vocabulary size and special
    tokens from the tokenizer; a pretrained one must come with a tokenizer that fits it. Returns the config with
    those values filled in (save that one)."""
    cfg = copy.deepcopy(cfg)
    tiny = cfg.model.tiny_clip
    if not text_model_folder(cfg) and tokenizer is not None:  # random-init: its vocabulary is the tokenizer's
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
    if tokenizer is not None:
        check_tokenizer(model, cfg, tokenizer)
    return model, cfg


def check_tokenizer(model: MMoEModel, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """ModelSetupError unless ``tokenizer`` fits the text encoder: no id beyond its embeddings, no text longer
    than its positions, and for a pretrained tower the same vocabulary as the tokenizer saved with it."""
    enc, towers = model.encoder, cfg.model.encoder == "towers"
    what = "text tower" if towers else "CLIP text model"
    if len(tokenizer) > enc.vocab_size:
        raise ModelSetupError(f"the tokenizer has {len(tokenizer)} tokens but the {what} only {enc.vocab_size}: use the "
                              f"tokenizer the {what} was trained with (data.tokenizer), or build a random-init one "
                              "(an empty model path)")
    positions = enc.max_text_positions
    if positions is not None and cfg.model.text_max_length > positions:
        raise ModelSetupError(f"model.text_max_length is {cfg.model.text_max_length} but the {what} has {positions} "
                              f"positions: set model.text_max_length to at most {positions}")
    path = text_model_folder(cfg)
    if not has_tokenizer(path) or Path(tokenizer.name_or_path) == Path(path):
        return  # no tokenizer saved with the encoder, or it is the one in use
    own = load_tokenizer(path)
    if own.get_vocab() != tokenizer.get_vocab():
        ours, theirs = tokenizer.get_vocab(), own.get_vocab()
        differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
        raise ModelSetupError(
            f"the tokenizer ({tokenizer.name_or_path or 'data.tokenizer'}, {len(ours)} tokens) is not the one the {what} "
            f"in {path} was trained with ({len(theirs)} tokens; e.g. {differ} differ): its ids would index the wrong "
            "embeddings. Leave data.tokenizer empty to use the model folder's tokenizer")
