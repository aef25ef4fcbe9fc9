"""The single-query link command on the tiny synthetic benchmark: results, entity cache, images."""

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import eval.link as link_mod
from data_shards.folder import ShardFolder
from data_shards.images import prepare_image
from eval.evaluate import kb_cache_location
from eval.kb_cache import load_kb_cache
from eval.link import link
from model.export import EXPORT_WEIGHTS, load_export
from model.factory import make_collator
from model.mmoe import BATCH_KEYS
from tests.support.link import DESC, MENTION, SENTENCE


@pytest.fixture(scope="module")
def query_image(tmp_path_factory):
    """A non-square JPEG, so the converter's resize and centre crop both matter."""
    path = tmp_path_factory.mktemp("query") / "photo.jpg"
    img = Image.new("RGB", (57, 41), (30, 60, 225))
    for x in range(0, 57, 3):
        img.putpixel((x, x % 41), (240, 210, 20))
    img.save(path, format="JPEG")
    return path


def direct_top(checkpoint, shards, image, k):
    """Score the query against every KB entity with the model itself: one entity batch, one score call."""
    model, cfg = load_export(checkpoint)
    model.eval()
    collator = make_collator(cfg, model)
    store = ShardFolder(shards).store()
    entities = collator.entities(store.get_many(range(len(store))))
    jpg = None
    if image is not None:
        jpg, _ = prepare_image(image, collator.image_size, ShardFolder(shards).settings["jpeg_quality"])
    meta = {"mention": MENTION, "sentence": SENTENCE, "desc": DESC, "gold_id": -1, "index": 0, "id": "q"}
    query = collator.mentions([{"json": meta, "jpg": jpg}])
    assert bool(query["image_mask"][0]) == (image is not None)
    with torch.no_grad():
        e_side, _ = model.entity_side({k_: entities[k_] for k_ in BATCH_KEYS})
        q_side, _ = model.mention_side({k_: query[k_] for k_ in BATCH_KEYS})
        scores = model.matcher.score(q_side, e_side)["overall"][0]
    top = scores.topk(k)
    return top.indices.tolist(), top.values, store


@pytest.mark.parametrize("with_image", [True, False])
def test_top_k_equals_scoring_every_entity_directly(tiny_export, tiny_shards, query_image, with_image):
    image = query_image if with_image else None
    results = link(tiny_export, SENTENCE, MENTION, image=image, desc=DESC, top_k=7, device="cpu")
    ids, scores, store = direct_top(tiny_export, tiny_shards, image, 7)
    assert [r.entity_id for r in results] == ids
    assert [r.rank for r in results] == list(range(1, 8))
    torch.testing.assert_close(torch.tensor([r.score for r in results]), scores, rtol=1e-5, atol=1e-5)
    for r in results:
        meta = store.get(r.entity_id)["json"]
        assert (r.qid, r.name) == (meta["qid"], meta["name"])


def test_two_stage_scores_are_the_full_matcher_scores(tiny_export, tiny_shards, query_image):
    exact = link(tiny_export, SENTENCE, MENTION, image=query_image, desc=DESC, top_k=200, device="cpu")
    two = link(tiny_export, SENTENCE, MENTION, image=query_image, desc=DESC, top_k=5, mode="two-stage", device="cpu")
    by_id = {r.entity_id: r.score for r in exact}
    assert len(two) == 5 and [r.score for r in two] == sorted((r.score for r in two), reverse=True)
    for r in two:  # re-ranked candidates carry the same scores as exact mode gives them
        assert r.score == pytest.approx(by_id[r.entity_id], abs=1e-5)


def test_cache_is_written_then_reused_until_the_weights_change(own_export, query_image, monkeypatch):
    calls = []
    real = link_mod.encode_kb

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(link_mod, "encode_kb", counting)
    first = link(own_export, SENTENCE, MENTION, image=query_image, device="cpu")
    _, cfg = load_export(own_export)
    cache, key = kb_cache_location(own_export, cfg, torch.device("cpu"))
    assert len(calls) == 1 and cache.is_file() and cache.name == f"kb_cache-{key[:16]}.pt"
    data = torch.load(cache, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in data.values())
    assert load_kb_cache(cache, key) is not None

    weights = own_export / EXPORT_WEIGHTS
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: still this cache
    second = link(own_export, SENTENCE, MENTION, image=query_image, device="cpu")
    assert len(calls) == 1  # read back, not encoded again
    assert [(r.entity_id, r.score) for r in second] == [(r.entity_id, r.score) for r in first]

    state = load_file(str(weights))
    name = next(k for k in state if k.startswith("matcher.") and state[k].is_floating_point())
    state[name] = state[name] + 0.01
    save_file(state, str(weights))  # a re-exported model
    link(own_export, SENTENCE, MENTION, image=query_image, device="cpu")
    assert len(calls) == 2 and len(list(own_export.glob("kb_cache-*.pt"))) == 2


def test_compact_cache_gives_the_fp32_top_entities(own_export, query_image):
    exact = link(own_export, SENTENCE, MENTION, image=query_image, desc=DESC, top_k=3, device="cpu")
    for dtype in ("float16", "int8"):
        for mode in ("exact", "two-stage"):
            small = link(own_export, SENTENCE, MENTION, image=query_image, desc=DESC, top_k=3, device="cpu", mode=mode,
                         cache_dtype=dtype)
            assert [r.entity_id for r in small] == [r.entity_id for r in exact], (dtype, mode)
            for a, b in zip(small, exact, strict=True):
                assert a.score == pytest.approx(b.score, abs=0.02 * abs(b.score) + 1e-3)
    assert len(list(own_export.glob("kb_cache-*.pt"))) == 3  # one file per cache dtype
