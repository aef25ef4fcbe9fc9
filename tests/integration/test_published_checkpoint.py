"""Published weights in: a Lightning-style checkpoint of the published code becomes our export, and
the compatibility mode evaluates with the published blocking."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from data_shards.collate import load_tokenizer
from model.config import save_config
from model.export import load_export, save_export
from model.mmoe import build_model
from moe.published import ours_to_published
from tests.support.helpers import ROOT, free_port, random_batch
from tests.support.published_checkpoint import tiny_config


class HyperParameters:  # what Lightning pickles beside the weights (an args object of the published code)
    def __init__(self) -> None:
        self.lr = 5e-6


class Payload:  # a checkpoint that would run a command when unpickled without weights_only
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


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
