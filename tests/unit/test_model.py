"""The MMoE model: gradients, batch independence, the entity cache, missing images, unit switches."""

import pytest
import torch

from model.config import LossConfig
from model.mmoe import MMoEModel
from moe.features import SideCache
from tests.support.helpers import random_batch, take, tiny_model_config
from train.loss import contrastive_loss


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MMoEModel(tiny_model_config()).eval()


def test_score_shapes_and_every_used_parameter_gets_a_gradient():
    torch.manual_seed(0)
    # top_k = num_experts so every expert is used by every token and must receive a gradient.
    model = MMoEModel(tiny_model_config(top_k=4)).train()
    mentions, entities = random_batch(6, 1, missing=(1,)), random_batch(6, 2, missing=(4,))
    scores, log = model(mentions, entities)
    assert set(scores) == {"overall", "text", "vision", "cross"}
    assert all(s.shape == (6, 6) for s in scores.values())
    loss, _ = contrastive_loss(scores, torch.arange(6), torch.arange(6), LossConfig(), log)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert no_grad == [], f"parameters without a gradient: {no_grad}"
    assert all(p.requires_grad for p in model.parameters())
    assert "encoder.clip.logit_scale" in dict(model.named_buffers())  # CLIP's unused temperature: a buffer


def test_default_gate_scores_do_not_depend_on_other_entities(model):
    mentions = random_batch(4, 3)
    entities = random_batch(9, 4, missing=(2,))
    with torch.no_grad():
        alone = model(mentions, take(entities, slice(0, 3)))[0]["overall"]
        crowded = model(mentions, entities)[0]["overall"][:, :3]
        reordered = model(take(mentions, [3, 2, 1, 0]), take(entities, [8, 2, 5, 0, 1]))[0]["overall"]
    torch.testing.assert_close(alone, crowded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reordered[:, [3, 1, 4]], crowded.flip(0)[:, [0, 2, 1]], rtol=1e-5, atol=1e-5)


def test_published_compat_scores_do_depend_on_other_entities():
    torch.manual_seed(0)
    model = MMoEModel(tiny_model_config(compat="published", top_k=2)).eval()
    mentions, entities = random_batch(4, 3), random_batch(9, 4)
    with torch.no_grad():
        alone = model(mentions, take(entities, slice(0, 3)))[0]["overall"]
        crowded = model(mentions, entities)[0]["overall"][:, :3]
    assert (alone - crowded).abs().max() > 1e-3


def test_cached_entity_blocks_equal_direct_pairwise_scoring(model):
    mentions, entities = random_batch(3, 5, missing=(0,)), random_batch(7, 6, missing=(3, 5))
    with torch.no_grad():
        # Cache built in blocks of 3 entities, then one block-scoring call per mention chunk.
        blocks = [model.entity_side(take(entities, slice(s, s + 3)))[0] for s in range(0, 7, 3)]
        cache = SideCache.cat(blocks)
        m_side, _ = model.mention_side(mentions)
        cached = model.matcher.score(m_side, cache)
        for i in range(3):
            for j in range(7):
                direct, _ = model(take(mentions, [i]), take(entities, [j]))
                for head in ("overall", "text", "vision", "cross"):
                    torch.testing.assert_close(cached[head][i, j], direct[head][0, 0], rtol=1e-5, atol=1e-5)


def test_paired_scoring_equals_the_diagonal_of_block_scoring(model):
    with torch.no_grad():
        m_side, _ = model.mention_side(random_batch(4, 11, missing=(2,)))
        e_side, _ = model.entity_side(random_batch(4, 12, missing=(0,)))
        block = model.matcher.score(m_side, e_side)
        paired = model.matcher.score_pairs(m_side, e_side)
    for head in block:
        torch.testing.assert_close(paired[head], block[head].diagonal(), rtol=1e-5, atol=1e-5)


def test_missing_image_is_not_a_black_picture_and_its_pixels_are_ignored(model):
    batch = random_batch(2, 7, missing=(1,))
    black = dict(batch, pixel_values=batch["pixel_values"].clone(), image_mask=torch.tensor([True, True]))
    black["pixel_values"][1] = 0.0
    noisy = dict(batch, pixel_values=batch["pixel_values"].clone())
    noisy["pixel_values"][1] = torch.randn(3, 32, 32)  # pixels of a row without an image
    entities = random_batch(3, 8)
    with torch.no_grad():
        missing = model(batch, entities)[0]["overall"]
        as_black = model(black, entities)[0]["overall"]
        with_noise = model(noisy, entities)[0]["overall"]
    torch.testing.assert_close(missing, with_noise)
    torch.testing.assert_close(missing[0], as_black[0])
    assert (missing[1] - as_black[1]).abs().max() > 1e-4


@pytest.mark.parametrize("off", ["text", "vision", "cross"])
def test_units_can_be_switched_off(off):
    cfg = tiny_model_config()
    cfg.matcher.units = {off: False}
    model = MMoEModel(cfg).eval()
    assert off not in model.matcher.units
    with torch.no_grad():
        scores, _ = model(random_batch(2, 1), random_batch(3, 2))
    assert off not in scores
    on = [u for u in ("text", "vision", "cross") if u != off]
    torch.testing.assert_close(scores["overall"], (scores[on[0]] + scores[on[1]]) / 2)


def test_separable_vectors_reproduce_the_cross_only_score():
    cfg = tiny_model_config()
    cfg.matcher.units = {"text": False, "vision": False}
    model = MMoEModel(cfg).eval()
    with torch.no_grad():
        m_side, _ = model.mention_side(random_batch(4, 1))
        e_side, _ = model.entity_side(random_batch(5, 2))
        exact = model.matcher.score(m_side, e_side)["overall"]
        approx = model.matcher.separable_vectors(m_side) @ model.matcher.separable_vectors(e_side).t()
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-5)


def test_tiny_clip_is_seeded():
    a, b = MMoEModel(tiny_model_config()), MMoEModel(tiny_model_config())
    for (n, pa), (_, pb) in zip(a.encoder.clip.named_parameters(), b.encoder.clip.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n


def test_clip_path_that_does_not_exist_says_what_to_do(tmp_path):
    cfg = tiny_model_config()
    cfg.clip_path = str(tmp_path / "no-such-clip")
    with pytest.raises(OSError, match="local folder"):
        MMoEModel(cfg)


def test_clip_loads_from_a_local_folder(tmp_path):
    model = MMoEModel(tiny_model_config())
    model.encoder.clip.save_pretrained(tmp_path / "clip")
    cfg = tiny_model_config()
    cfg.clip_path = str(tmp_path / "clip")
    cfg.tiny_clip.seed = 123  # ignored when a path is given
    loaded = MMoEModel(cfg)
    for (n, pa), (_, pb) in zip(model.encoder.clip.named_parameters(), loaded.encoder.clip.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n


def test_export_round_trip_gives_the_same_scores(tmp_path):
    from model.config import Config
    from model.export import load_export, save_export

    cfg = Config(model=tiny_model_config())
    model = MMoEModel(cfg.model).eval()
    save_export(model, cfg, tmp_path / "best")
    loaded, loaded_cfg = load_export(tmp_path / "best")
    assert loaded_cfg == cfg
    mentions, entities = random_batch(3, 1), random_batch(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(mentions, entities)[0]["overall"], model(mentions, entities)[0]["overall"])


def test_activation_checkpointing_gives_the_gradients_of_keeping_the_activations():
    import copy

    torch.manual_seed(0)
    plain = MMoEModel(tiny_model_config())
    recomputing = copy.deepcopy(plain)
    recomputing.encoder.enable_activation_checkpointing()
    m, e = random_batch(4, 1, missing=(2,)), random_batch(5, 2)
    for model in (plain, recomputing):
        scores, log = model(m, e)
        (sum(s.logsumexp(1).sum() for s in scores.values()) + sum(log.total())).backward()
    grads = dict(plain.named_parameters())
    checked = [n for n, p in recomputing.named_parameters() if n.startswith("encoder.clip.") and p.grad is not None]
    assert len(checked) > 20
    for n in checked:
        assert torch.allclose(dict(recomputing.named_parameters())[n].grad, grads[n].grad, atol=1e-6), n
    assert recomputing.encoder.clip.text_model.encoder.gradient_checkpointing  # it really recomputes


def test_compile_parts_wraps_the_chosen_parts_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = MMoEModel(tiny_model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text, vision = model.encoder.clip.text_model, model.encoder.clip.vision_model
    model.compile_parts("encoder")  # lazy: nothing is compiled until the first forward
    assert text._compiled_call_impl is not None and vision._compiled_call_impl is not None
    assert "_side" not in vars(model.matcher)  # the matcher is left eager
    model.compile_parts("matcher")
    assert "_side" in vars(model.matcher) and "_score" in vars(model.matcher)
    after = model.state_dict()
    assert list(after) == list(before)  # checkpoints and exports keep their keys
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="compile parts must be one of"):
        model.compile_parts("clip")


def test_train_compile_refuses_an_unknown_part():
    from core.typed_config import ConfigError
    from model.config import load_config

    with pytest.raises(ConfigError, match=r"train.compile: expected one of \('none', 'encoder', 'matcher', 'all'\)"):
        load_config(None, ["train.compile=clip"])
