"""Tokenizers for from-scratch runs: the word-level tokenizer command, text pooling at the last real token
(any tokenizer), BERT-style tokenizers, and a clear refusal when a tokenizer lacks what the model needs."""

import json

import pytest
import torch
from transformers import AutoTokenizer, BertTokenizerFast, CLIPModel

from data_shards.collate import Collator
from data_shards.tokenizer import main as tokenizer_main
from model.config import Config
from model.encoder import ClipEncoder, TinyClipSettings, pool_last_token
from model.mmoe import ModelSetupError, build_model
from tests.support.fixtures import write_fixture
from tests.support.helpers import random_batch, tiny_model_config


def _tiny_clip(eos: int, vocab: int = 100) -> CLIPModel:
    s = TinyClipSettings(vocab_size=vocab, bos_token_id=2, eos_token_id=eos, pad_token_id=0, text_hidden=32,
                         vision_hidden=32, layers=1, heads=2, image_size=32, patch_size=8, projection_dim=24,
                         max_text_positions=32, seed=0)
    torch.manual_seed(0)
    return CLIPModel(s.clip_config())


def test_last_token_pooling_equals_clips_when_the_eos_ends_the_text():
    clip = _tiny_clip(eos=99)
    b = random_batch(6, seed=3)  # bos 98 ... eos 99, then padding 0
    out = clip.text_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    pooled = pool_last_token(out.last_hidden_state, b["attention_mask"])
    # equal to HF's pooler: last_hidden_state is already after the final LayerNorm in this transformers version
    assert torch.allclose(pooled, out.pooler_output, atol=1e-6)
    # and the encoder's global vector is the projection of exactly that
    enc = ClipEncoder(clip, text_dim=24, image_dim=16).eval()
    feats = enc(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_mask"])
    assert torch.allclose(feats.text_global, clip.text_projection(out.pooler_output), atol=1e-6)


def test_a_separator_equal_to_eos_does_not_cut_the_text_short():
    clip = _tiny_clip(eos=3)  # BERT-style: [SEP] (3) separates mention and sentence and ends the text
    enc = ClipEncoder(clip, text_dim=24, image_dim=16).eval()
    ids = torch.tensor([[2, 10, 3, 20, 21, 22, 3, 0], [2, 10, 3, 30, 31, 32, 3, 0]])  # same mention, other sentence
    mask = (ids != 0).long()
    out = clip.text_model(input_ids=ids, attention_mask=mask)
    assert torch.allclose(out.pooler_output[0], out.pooler_output[1])  # HF pools after the mention: sentence lost
    feats = enc(ids, mask, torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.bool))
    assert not torch.allclose(feats.text_global[0], feats.text_global[1], atol=1e-4)
    assert torch.allclose(pool_last_token(out.last_hidden_state, mask), out.last_hidden_state[:, 6])


def _bert_tokenizer(tmp_path) -> BertTokenizerFast:
    """A real BERT tokenizer (WordPiece, [CLS] ... [SEP], no bos/eos) on a small vocabulary, saved and reloaded."""
    words = ["paris", "jordan", "river", "is", "a", "city", "the", "in"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    BertTokenizerFast(vocab=vocab).save_pretrained(str(tmp_path / "bert"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "bert"))
    assert len(tok) == len(vocab) and tok.convert_tokens_to_ids("river") == 7
    return tok


def _config() -> Config:
    cfg = Config(model=tiny_model_config())
    t = cfg.model.tiny_clip
    t.vocab_size, t.bos_token_id, t.eos_token_id, t.pad_token_id = 0, -1, -1, -1  # from the tokenizer
    return cfg


def test_a_bert_style_tokenizer_works(tmp_path):
    tok = _bert_tokenizer(tmp_path)
    assert tok.bos_token_id is None and tok.eos_token_id is None
    model, cfg = build_model(_config(), tok)
    t = cfg.model.tiny_clip
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.vocab_size) == (2, 3, 0, len(tok))
    collator = Collator(tok, image_size=32, max_length=17)
    meta = {"mention": "Paris", "sentence": "Paris is a city", "desc": "the city", "gold_id": 0, "index": 0}
    other = dict(meta, sentence="the Jordan river", index=1)
    batch = collator.mentions([{"json": meta, "jpg": None}, {"json": other, "jpg": None}])
    assert batch["input_ids"][0, :6].tolist() == [2, 5, 3, 5, 8, 9]  # [CLS] paris [SEP] paris is a: [SEP] = eos id
    model.eval()
    with torch.no_grad():
        g = model.features(batch).text_global
    assert not torch.allclose(g[0], g[1], atol=1e-4)  # the sentences after the first [SEP] count


def test_a_tokenizer_without_needed_tokens_is_refused_with_what_to_do(tmp_path):
    tok = _bert_tokenizer(tmp_path)
    tok.pad_token = None
    with pytest.raises(ModelSetupError, match="no pad token.*python -m data_shards.tokenizer"):
        build_model(_config(), tok)
    cfg = _config()
    cfg.model.tiny_clip.vocab_size = 5
    with pytest.raises(ModelSetupError, match="only 5"):
        build_model(cfg, _bert_tokenizer(tmp_path))


def test_tokenizer_command_builds_from_kb_and_train_only(tmp_path, capsys):
    write_fixture(tmp_path / "raw", "MyArt_{split}.json")
    tokenizer_main(["--root", str(tmp_path / "raw"), "--out", str(tmp_path / "raw" / "tokenizer")])
    assert "unknown words in dev" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "raw" / "tokenizer"))
    vocab = tok.get_vocab()
    assert vocab["[SEP]"] == 2 and tok.pad_token_id == 0 and tok.eos_token_id == len(vocab) - 1
    assert {"basketball", "brazil", "dunks", "hilton", "são", "desc"} <= set(vocab)  # KB and train words
    assert "floods" not in vocab and "borders" not in vocab  # dev/test-only words
    ids = tok("Paris [SEP] Jordan borders Israel")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids[2] == 2
    assert tok.convert_ids_to_tokens(ids[4]) == "[UNK]"
    build = json.loads((tmp_path / "raw" / "tokenizer" / "build.json").read_text())
    assert build["dataset"] == "MyArt" and 0 < build["unknown_share"]["test"] < 1
    # A model builds on it (the tiny CLIP takes its sizes and special tokens from it).
    model, cfg = build_model(_config(), tok)
    assert cfg.model.tiny_clip.vocab_size == len(tok)


def _listing(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tokenizer_command_writes_only_into_a_new_empty_or_own_folder(tmp_path):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    before = _listing(raw)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for out in (raw, foreign, foreign / "notes.txt"):  # the dataset folder, someone's folder, a file
        with pytest.raises(SystemExit, match=f"error: {out} (is not empty and was not created by data_shards.tokenizer"
                                             "|exists and is not a folder)"):
            tokenizer_main(["--root", str(raw), "--out", str(out)])
    assert _listing(raw) == before and _listing(foreign) == {"notes.txt": b"mine"}
    out = raw / "tokenizer"
    tokenizer_main(["--root", str(raw), "--out", str(out)])
    first = _listing(out)
    assert "tokenizer.json" in first and ".written-by.json" in first
    tokenizer_main(["--root", str(raw), "--out", str(out), "--min-freq", "2"])  # its own folder: rewritten
    assert json.loads((out / "build.json").read_text())["min_freq"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    tokenizer_main(["--root", str(raw), "--out", str(empty)])
    assert (empty / "tokenizer.json").is_file()


def test_tokenizer_command_on_a_full_disk_says_so_in_one_line(tmp_path, small_disk):
    raw = tmp_path / "raw"
    write_fixture(raw, "wikimel")
    disk = small_disk(4)  # one page: the tokenizer's files do not fit
    with pytest.raises(SystemExit, match=r"error: the disk is full \(no space left on device writing .*"
                                         + str(disk / "tok")):
        tokenizer_main(["--root", str(raw), "--out", str(disk / "tok")])
