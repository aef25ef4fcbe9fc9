"""Published weights in: a Lightning-style checkpoint of the published code becomes our export, and
the compatibility mode evaluates with the published blocking."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from data_shards.collate import load_tokenizer
from data_shards.folder import ShardFolder
from data_shards.stream import OrderedStream, make_loader
from eval.encode import encode_side
from model.config import Config, DataConfig, EvalConfig, save_config
from model.export import load_export, save_export
from model.factory import make_collator
from model.mmoe import build_model
from moe.published import ours_to_published
from tests.helpers import free_port, random_batch, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]


class HyperParameters:  # what Lightning pickles beside the weights (an args object of the published code)
    def __init__(self) -> None:
        self.lr = 5e-6


class Payload:  # a checkpoint that would run a command when unpickled without weights_only
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tiny_config(shards: Path, compat: str = "published") -> Config:
    cfg = tiny_model_config(compat=compat)
    t = cfg.tiny_clip
    t.vocab_size, t.bos_token_id, t.eos_token_id, t.pad_token_id = 0, -1, -1, -1  # from the tokenizer
    return Config(model=cfg, data=DataConfig(shards=str(shards), num_workers=0),
                  eval=EvalConfig(batch_size=16, num_workers=0, compat_entity_block=7, compat_mention_batch=5))


def published_checkpoint(model, marker: Path) -> dict:
    """The published code's checkpoint layout: Lightning's ``state_dict`` with its names."""
    state = {}
    for key, value in model.encoder.state_dict().items():
        key = key.replace("image_global_proj.", "image_cls_fc.").replace("image_token_proj.", "image_tokens_fc.")
        state["encoder." + key] = value.clone()
    for key, value in ours_to_published(model.matcher).items():
        state["matcher." + key] = value.clone()
    d = state["matcher.cross_module.gate_layer_norm.weight"].shape[0]
    state["matcher.cross_module.context_layer_norm.weight"] = torch.ones(d)
    state["matcher.cross_module.context_layer_norm.bias"] = torch.zeros(d)
    return {"state_dict": state, "epoch": 7, "pytorch-lightning_version": "1.9.0",
            "hyper_parameters": {"args": HyperParameters(), "callback": Payload(marker)}}


def test_a_published_checkpoint_becomes_an_export_with_exactly_its_weights(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards)
    tok = load_tokenizer(tiny_shards / "tokenizer")
    torch.manual_seed(7)
    trained, resolved = build_model(cfg, tok)  # stands in for a model trained by the published code
    marker = tmp_path / "pwned"
    torch.save(published_checkpoint(trained, marker), tmp_path / "WikiMEL.ckpt")
    save_config(resolved, tmp_path / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "model.published_checkpoint", "--checkpoint", str(tmp_path / "WikiMEL.ckpt"),
                           "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "best")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "context_layer_norm" in proc.stdout  # reported as not used
    assert not marker.exists(), "loading the checkpoint executed code it names"
    loaded, loaded_cfg = load_export(tmp_path / "best")
    assert loaded_cfg.model.matcher.compat == "published"
    own = loaded.state_dict()
    for key, value in trained.state_dict().items():
        if "no_image" not in key:  # no published counterpart
            assert torch.equal(own[key], value), key
    m, e = random_batch(3, 1, missing=(1,)), random_batch(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(m, e)[0]["overall"], trained.eval()(m, e)[0]["overall"], rtol=0, atol=0)


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "x.ckpt")
    proc = subprocess.run([sys.executable, "-m", "model.published_checkpoint", "--checkpoint", str(tmp_path / "x.ckpt"),
                           "--config", str(ROOT / "launch/configs/tiny.yaml"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no state dict of tensors" in proc.stderr


def test_compat_evaluation_computes_each_side_on_the_published_blocks(tiny_shards):
    cfg = tiny_config(tiny_shards)
    torch.manual_seed(0)
    model, cfg = build_model(cfg, load_tokenizer(tiny_shards / "tokenizer"))
    model.eval()
    collator = make_collator(cfg, model)
    kb_stream = OrderedStream(ShardFolder(cfg.data.shards), "kb", collator, 16, 1, 0)
    device = torch.device("cpu")

    def encode(block):
        return encode_side(model, make_loader(kb_stream, 0), device, entity=True, block=block)[0]

    blocked = encode(7)
    # Reference: features of the whole KB, then the matcher's entity side on rows 0-6, 7-13, ...
    with torch.no_grad():
        feats = [model.features({k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")})
                 for b in make_loader(kb_stream, 0)]
        from moe.features import Features

        allf = Features.cat(feats)
        ref = [model.matcher.entity_side(allf.index(slice(s, s + 7)))[0] for s in range(0, len(allf), 7)]
    for key in blocked.tensors:
        torch.testing.assert_close(blocked[key], torch.cat([r[key] for r in ref]), rtol=0, atol=0, msg=key)
    # Another blocking gives other numbers: that is the published evaluation's batch dependence.
    assert (encode(16)["text.g"] - blocked["text.g"]).abs().max() > 1e-4
    # The default model ignores the blocking.
    torch.manual_seed(0)
    default, _ = build_model(tiny_config(tiny_shards, compat="none"), load_tokenizer(tiny_shards / "tokenizer"))
    default.eval()
    a = encode_side(default, make_loader(kb_stream, 0), device, entity=True, block=7)[0]
    b = encode_side(default, make_loader(kb_stream, 0), device, entity=True)[0]
    torch.testing.assert_close(a["text.g"], b["text.g"], rtol=1e-5, atol=1e-5)


def test_compat_evaluation_gives_the_same_numbers_on_one_and_two_processes(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards)
    torch.manual_seed(0)
    model, resolved = build_model(cfg, load_tokenizer(tiny_shards / "tokenizer"))
    save_export(model, resolved, tmp_path / "best")
    runs = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                            f"--master_port={free_port()}"]}
    ranks = {}
    for name, launcher in runs.items():
        # save_kb_cache off: the second run must encode the KB in its own blocks, not reuse the first's cache
        proc = subprocess.run(launcher + ["-m", "eval.evaluate", "--checkpoint", str(tmp_path / "best"), "--split", "test",
                                          "--out", str(tmp_path / name), "--set", "eval.save_kb_cache=false"],
                              cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / name / "per_mention-test.jsonl").read_text().splitlines()]
        ranks[name] = [(r["index"], r["rank"], r["top_ids"]) for r in rows]
    assert ranks["one"] and ranks["one"] == ranks["two"]
