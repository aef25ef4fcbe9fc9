"""The evaluation command end to end on the tiny synthetic benchmark, one and two processes."""

import torch

from eval.evaluate import evaluate_split


def test_evaluate_split_restores_training_mode(tiny_export, tiny_shards):
    from model.export import load_export

    model, cfg = load_export(tiny_export)
    model.train()
    res = evaluate_split(model, cfg, "dev", torch.device("cpu"))
    assert model.training and res.metrics["mentions"] > 0
