"""The trainer as users run it: launch/train.py in its own processes (CPU, gloo, fp32)."""

import json

import pytest
import torch


def test_train_state_writes_the_json_checkpoints_have_always_held():
    from train.state import TrainState

    fresh = {"epoch": 0, "batch": 0, "step": 0, "best_mrr": -1.0, "best_step": -1, "bad_evals": 0, "stopped_early": False,
             "wandb_id": None, "evals": [], "negatives_file": None, "negatives_epoch": -1, "bad_steps": 0,
             "epoch_segments": [], "eval_pending": False, "phase_s": {}}
    assert json.dumps(TrainState().state_dict()) == json.dumps(fresh)
    saved = {**fresh, "step": 7, "evals": [{"step": 5, "epoch": 0, "MRR": 50.0, "H@1": 40.0}], "later_key": 1}
    del saved["bad_steps"], saved["epoch_segments"], saved["eval_pending"], saved["phase_s"]  # older: the defaults
    state = TrainState()
    state.load_state_dict(json.loads(json.dumps(saved)))
    assert state.step == 7 and state.bad_steps == 0 and state.evals[0]["MRR"] == 50.0
    # An unknown key is written back as read.
    assert state.state_dict() == {**saved, "bad_steps": 0, "epoch_segments": [], "eval_pending": False, "phase_s": {}}


def test_metrics_window_averages_the_applied_steps_over_their_micro_batches():
    import torch

    from train.observe import MetricsWindow

    w = MetricsWindow()
    for loss in (1.0, 3.0):  # one optimizer step of two micro-batches
        w.add({"loss": torch.tensor(loss)}, {"layer0": (torch.tensor([1, 2]), torch.tensor(0))}, samples=8)
    assert w.step_means() == {"loss": 2.0}
    w.end_step(applied=True)
    w.add({"loss": float("nan")}, {"layer0": (torch.tensor([5, 5]), torch.tensor(1))}, samples=8)
    w.end_step(applied=False)  # a skipped bad step: samples and time, no losses or loads
    assert w.micro == 2 and w.samples == 24 and w.mean_losses() == {"train/loss": 2.0}
    assert w.loads["layer0"][0].tolist() == [2, 4] and int(w.loads["layer0"][1]) == 0
    w.reset()
    assert w.micro == 0 and w.samples == 0 and not w.loads


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU computes bf16 and fp16")
@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_half_precision_without_a_gpu_is_refused_by_name(half):
    """DeepSpeed would cast the weights and fail later inside a LayerNorm ('mixed dtype (CPU)')."""
    from train.build import resolve_precision
    from train.checkpoint_manager import RunSetupError

    assert resolve_precision("auto") == "fp32"
    with pytest.raises(RunSetupError, match=f"train.precision={half} needs a GPU"):
        resolve_precision(half)


def test_every_adamw_implementation_makes_the_same_update():
    from train.build import ADAMW_KWARGS
    from train.step_guard import GuardedAdamW

    results = {}
    for name, kwargs in ADAMW_KWARGS.items():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
        opt = GuardedAdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                           lr=1e-2, eps=1e-8, **kwargs)
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
        results[name] = [p.detach().clone() for p in params]
    start = [torch.randn(7, 5, generator=torch.Generator().manual_seed(0))]
    for name, got in results.items():
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, results["loop"], strict=True)), name
    assert not torch.allclose(results["loop"][0], start[0])  # the steps moved the weights
