"""The tokenizer and the collator a model needs, chosen from the config (one place for the trainer,
evaluation, mining and single-query linking)."""

from __future__ import annotations

from pathlib import Path

from core.typed_config import ConfigError
from data_shards.collate import Collator, load_tokenizer
from model.config import Config


def resolve_tokenizer(cfg: Config) -> str:
    """``data.tokenizer``, else a pretrained text tower's own folder (``model.encoder: towers``), else the shards'
    ``tokenizer/`` folder, else the CLIP folder's tokenizer."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.encoder == "towers" and cfg.model.towers.text_path:
        return cfg.model.towers.text_path
    local = Path(cfg.data.shards) / "tokenizer"
    if local.is_dir():
        return str(local)
    if cfg.model.clip_path:
        return cfg.model.clip_path
    raise ConfigError("data.tokenizer is empty, the shards have no tokenizer/ folder and model.clip_path is empty: "
                      "say which tokenizer to use")


def make_collator(cfg: Config, model) -> Collator:
    """The collator for ``model`` (an ``MMoEModel``: its encoder's image size and normalisation) under ``cfg``."""
    norm = model.encoder.image_mean_std
    extra = {"mean": tuple(norm[0]), "std": tuple(norm[1])} if norm else {}
    return Collator(load_tokenizer(resolve_tokenizer(cfg)), model.encoder.image_size, cfg.model.text_max_length,
                    mention_desc=cfg.data.mention_desc, entity_desc=cfg.data.entity_desc, **extra)
