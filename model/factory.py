"""The tokenizer and the collator a model needs, chosen from the config (one place for the trainer,
evaluation, mining and single-query linking)."""

from __future__ import annotations

from pathlib import Path

from core.typed_config import ConfigError
from data_shards.collate import Collator, has_tokenizer, load_tokenizer
from model.config import Config


def text_model_folder(cfg: Config) -> str:
    """The folder the text encoder is loaded from (``model.clip_path`` or ``model.towers.text_path``); "": random-init."""
    return cfg.model.towers.text_path if cfg.model.encoder == "towers" else cfg.model.clip_path


def resolve_tokenizer(cfg: Config) -> str:
    """``data.tokenizer``, else the tokenizer saved with a pretrained text encoder (its ids index its embeddings),
    else the shards' ``tokenizer/`` folder, else the text encoder's folder."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    folder = text_model_folder(cfg)
    if has_tokenizer(folder):
        return folder
    local = Path(cfg.data.shards) / "tokenizer"
    if local.is_dir():
        return str(local)
    if folder:
        return folder
    raise ConfigError("data.tokenizer is empty, the shards have no tokenizer/ folder and the model has no folder "
                      "(model.clip_path, model.towers.text_path): say which tokenizer to use")


def make_collator(cfg: Config, model) -> Collator:
    """The collator for ``model`` (an ``MMoEModel``: its encoder's image size and normalisation) under ``cfg``."""
    norm = model.encoder.image_mean_std
    extra = {"mean": tuple(norm[0]), "std": tuple(norm[1])} if norm else {}
    return Collator(load_tokenizer(resolve_tokenizer(cfg)), model.encoder.image_size, cfg.model.text_max_length,
                    mention_desc=cfg.data.mention_desc, entity_desc=cfg.data.entity_desc, **extra)
