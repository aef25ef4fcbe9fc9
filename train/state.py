"""The trainer's resumable state: data position, step, best-so-far, bad steps, W&B run id.

Saved as the ``trainer`` entry of a checkpoint's ``complete.json`` (train/checkpointing.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    batch: int = 0  # micro-batches done in the current epoch (this rank's)
    step: int = 0  # optimizer steps taken (skipped bad steps included)
    best_mrr: float = -1.0  # best dev MRR so far
    best_step: int = -1  # the step it was reached at; -1: never evaluated on dev
    bad_evals: int = 0  # dev evaluations since the last improvement (early stopping)
    stopped_early: bool = False
    wandb_id: str | None = None  # the W&B run a resumed run continues
    evals: list[dict[str, Any]] = field(default_factory=list)  # every dev evaluation: step, epoch, MRR, H@1
    negatives_file: str | None = None  # the hard-negatives table attached to the stream
    negatives_epoch: int = -1  # the epoch negatives were last mined at
    bad_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    # Earlier parts of the current epoch trained with another layout (world size, batch size, workers,
    # shuffle buffer) and their batch counts, oldest first: a run resumed on other hardware continues the
    # epoch over the samples they did not consume (data_shards/stream.py, "the epoch plan").
    epoch_segments: list[dict[str, Any]] = field(default_factory=list)
    eval_pending: bool = False  # the dev evaluation due at this step was put off by a stop request
    phase_s: dict[str, float] = field(default_factory=dict)  # wall seconds per phase so far (train/phases.py)

    def __post_init__(self) -> None:
        self._unknown: dict[str, Any] = {}  # keys of a saved state this version does not know: written back as read

    def state_dict(self) -> dict[str, Any]:
        """The JSON-ready state, keys in the order complete.json has always held them."""
        return {**asdict(self), **self._unknown}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take a saved state; keys it lacks (a checkpoint older than them) keep their current values."""
        known = set(self.__dataclass_fields__)
        for key, value in saved.items():
            if key in known:
                setattr(self, key, value)
            else:
                self._unknown[key] = value
