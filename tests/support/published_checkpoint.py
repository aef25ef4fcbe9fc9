"""Shared by tests/unit/test_published_checkpoint.py and tests/integration/test_published_checkpoint.py."""

from pathlib import Path

from model.config import Config, DataConfig, EvalConfig
from tests.support.helpers import tiny_model_config


def tiny_config(shards: Path, compat: str = "published") -> Config:
    cfg = tiny_model_config(compat=compat)
    t = cfg.tiny_clip
    t.vocab_size, t.bos_token_id, t.eos_token_id, t.pad_token_id = 0, -1, -1, -1  # from the tokenizer
    return Config(model=cfg, data=DataConfig(shards=str(shards), num_workers=0),
                  eval=EvalConfig(batch_size=16, num_workers=0, compat_entity_block=7, compat_mention_batch=5))
