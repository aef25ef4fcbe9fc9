"""Run logging: a JSONL metrics file always, W&B when enabled (rank 0 only); the training-metrics
window between two log rows and its expert loads over the world; console messages from rank 0."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import distributed as D
from model.config import Config, to_dict

STEP_METRIC = "trainer/step"  # the x axis of every W&B chart (W&B's own _step counts log calls)


def wandb_mode(requested: str) -> str:
    """auto -> online when an API key is configured, offline otherwise (W&B fails fast without a key)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _kept_rows(path: Path, keep_rows: int | None, keep_step: int | None) -> list[str]:
    if keep_rows == 0 or not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]  # drop a torn last line
    if keep_rows is not None:
        return lines[:keep_rows]
    return [line for line in lines if json.loads(line).get("step", 0) <= (keep_step or 0)]


class RunLog:
    """metrics.jsonl in the run folder plus, if enabled, a W&B run with the resolved config."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, resume_id: str | None = None,
                 keep_rows: int | None = 0, keep_step: int | None = None) -> None:
        """``keep_rows``: rows of an existing metrics.jsonl to keep (0: a fresh run; a resumed run keeps
        the rows written up to its checkpoint, so the steps it redoes are not there twice); None: keep the
        rows up to ``keep_step`` (checkpoints written before the row count was recorded)."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = None
        self.wandb_id: str | None = None
        self.rows = 0  # rows in metrics.jsonl (recorded in checkpoints)
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        kept = _kept_rows(path, keep_rows, keep_step)
        path.write_text("".join(kept))
        self.rows = len(kept)
        self.jsonl = open(path, "a", buffering=1)
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=cfg.train.run_name, tags=cfg.wandb.tags,
                dir=cfg.wandb.dir or str(run_dir), mode=mode, config=to_dict(cfg), id=resume_id,
                resume="allow" if resume_id else None,
            )
            self.wandb_id = self.wandb.id
            # Our step is a metric, not W&B's own step: W&B's step only ever increases (a log with a
            # lower step is dropped, as the test metrics once were after the leaderboard's log), and a
            # resumed run redoes steps. Every chart is drawn against trainer/step.
            self.wandb.define_metric(STEP_METRIC)
            self.wandb.define_metric("*", step_metric=STEP_METRIC)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled or self.jsonl.closed:
            return
        # JSON has no NaN/Infinity: a non-finite value is written as null (strict JSON for every reader).
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        self.rows += 1
        if self.wandb is not None:
            self.wandb.log({**metrics, STEP_METRIC: step})

    def finish(self, exit_code: int = 0, preempted: bool = False) -> str | None:
        """Close the run (once); returns where an offline W&B run was written (to sync it later). A
        preempted run is marked so in W&B (resumable, not crashed)."""
        if not self.enabled or self.jsonl.closed:
            return None
        self.jsonl.close()
        if self.wandb is None:
            return None
        if preempted:
            self.wandb.mark_preempting()
        folder = getattr(self.wandb, "dir", None)
        offline = self.wandb.settings.mode == "offline" if hasattr(self.wandb, "settings") else False
        self.wandb.finish(exit_code=exit_code)
        if offline and folder:
            return str(Path(folder).parent)
        return None


class RankLog:
    """Console messages from rank 0 only (the other ranks would repeat them), written through tqdm so a
    progress bar on the terminal stays intact: ``info`` to stdout, ``warn`` to stderr."""

    def __init__(self, main: bool) -> None:
        self.main = main

    def info(self, message: str) -> None:
        if self.main:
            self._write(message, sys.stdout)

    def warn(self, message: str) -> None:
        if self.main:
            self._write(message, sys.stderr)

    @staticmethod
    def _write(message: str, stream: TextIO) -> None:
        tqdm.write(message, file=stream)
        stream.flush()


def _add_loads(into: dict[str, list], loads: dict[str, Any]) -> None:
    """Sum per-layer (expert route counts, dropped tokens) pairs into ``into``."""
    for name, (counts, dropped) in loads.items():
        c0, d0 = into.get(name, (0, 0))
        into[name] = [c0 + counts, d0 + dropped]


class MetricsWindow:
    """Losses, expert loads and samples of the training steps between two log rows.

    Micro-batches add to the optimizer step being accumulated; ``end_step`` folds that step into the
    window if it was applied (a skipped bad step adds its samples and time, not its losses); the log row
    averages the window's losses over its micro-batches, then ``reset`` starts the next window."""

    def __init__(self) -> None:
        self._new_step()
        self.reset()

    def _new_step(self) -> None:
        self.step_sums: dict[str, float] = {}
        self.step_loads: dict[str, list] = {}
        self.step_micro = 0

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.loads: dict[str, list] = {}  # per MoE layer: [expert route counts, dropped tokens], this rank
        self.micro = 0  # micro-batches of the applied steps
        self.samples = 0  # real (not padding) samples of every micro-batch, this rank
        self.started = time.perf_counter()

    def add(self, parts: dict[str, Any], loads: dict[str, Any], samples: int) -> None:
        """One micro-batch: its loss parts (tensors or floats), expert loads and real samples."""
        for k, v in parts.items():
            self.step_sums[k] = self.step_sums.get(k, 0.0) + float(v)
        _add_loads(self.step_loads, loads)
        self.step_micro += 1
        self.samples += samples

    def step_means(self) -> dict[str, float]:
        """The loss parts of the step being accumulated, averaged over its micro-batches."""
        return {k: v / self.step_micro for k, v in self.step_sums.items()}

    def end_step(self, applied: bool) -> None:
        if applied:
            for k, v in self.step_sums.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            _add_loads(self.loads, self.step_loads)
            self.micro += self.step_micro
        self._new_step()

    def mean_losses(self) -> dict[str, float]:
        """``train/<part>``: each loss part averaged over the window's micro-batches (needs ``micro`` > 0)."""
        return {f"train/{k}": v / self.micro for k, v in self.sums.items()}

    def samples_per_s(self, world: int) -> float:
        return self.samples * world / max(time.perf_counter() - self.started, 1e-9)


def expert_load(loads: dict[str, list], device: torch.device) -> dict[str, float]:
    """Fraction of routes per expert and dropped tokens, per MoE layer, over all ranks (collective).

    Both backends count, on each rank, the routes of that rank's own tokens to every (global)
    expert before any all-to-all (DeepSpeed's exp_counts are per rank), so the sum over the
    world is each expert's whole load: every expert-parallel group plus, when world > ep_size,
    the data-parallel replicas of its experts."""
    out: dict[str, float] = {}
    for name, (counts, dropped) in sorted(loads.items()):
        t = torch.cat([counts.float().view(-1), dropped.float().view(1)]).to(device)
        if D.world() > 1:
            dist.all_reduce(t)
        frac = t[:-1] / t[:-1].sum().clamp_min(1)
        for e, f in enumerate(frac.tolist()):
            out[f"moe/{name}/expert{e}"] = f
        out[f"moe/{name}/dropped_tokens"] = t[-1].item()
    return out
