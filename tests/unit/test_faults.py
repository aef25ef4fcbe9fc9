"""Fault injection end to end on the tiny preset: what the trainer and the evaluator refuse, recover
from or count instead of producing a wrong number (docs/checks.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval.metrics import NonFiniteScoreError, gold_ranks


def test_gold_ranks_refuses_nan_anywhere_in_a_row():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, float("nan"), 0.1], [float("nan"), 0.3, 0.2], [0.1, 0.2, float("inf")]])
    with pytest.raises(NonFiniteScoreError) as err:
        gold_ranks(scores, torch.tensor([0, 0, 0, 1]))
    assert err.value.rows == [1, 2, 3]
    rank, ties = gold_ranks(scores[:1], torch.tensor([0]))  # finite rows: unchanged behaviour
    assert rank.tolist() == [1] and ties.tolist() == [0]


class _RunsCode:
    """Pickles as a call of os.system: what a crafted checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_export_refuses_a_crafted_checkpoint_without_running_it(tiny_export, tmp_path, capsys):
    from train.checkpointing import UnsafeCheckpointError, export_checkpoint
    from train.checkpointing import main as checkpoint_main

    folder = tmp_path / "run" / "checkpoints" / "step-0000001"
    folder.mkdir(parents=True)
    shutil.copy(tiny_export / "config.yaml", tmp_path / "run" / "config.yaml")
    marker = tmp_path / "marker"
    weights = load_file(str(tiny_export / "model.safetensors"))
    torch.save({"module": weights, "ds_config": _RunsCode(marker)}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*mp_rank_00_model_states\.pt: it needs posix\.system"):
        export_checkpoint(folder, tmp_path / "out")
    with pytest.raises(SystemExit) as exc:
        checkpoint_main(["export", str(folder), str(tmp_path / "out")])
    assert "refusing to load" in str(exc.value.code)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The same file without the payload exports (tensors and containers are all an export needs).
    torch.save({"module": weights, "ds_config": {"train_micro_batch_size_per_gpu": 8}}, folder / "mp_rank_00_model_states.pt")
    export_checkpoint(folder, tmp_path / "out")
    assert load_file(str(tmp_path / "out" / "model.safetensors")).keys() == weights.keys()
