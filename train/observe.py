"""Run logging: a JSONL metrics file always, W&B when enabled (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from train.config import Config, to_dict


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


class RunLog:
    """metrics.jsonl in the run folder plus, if enabled, a W&B run with the resolved config."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, resume_id: str | None = None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = None
        self.wandb_id: str | None = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=cfg.train.run_name, tags=cfg.wandb.tags,
                dir=cfg.wandb.dir or str(run_dir), mode=mode, config=to_dict(cfg), id=resume_id,
                resume="allow" if resume_id else None,
            )
            self.wandb_id = self.wandb.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled or self.jsonl.closed:
            return
        # JSON has no NaN/Infinity: a non-finite value is written as null (strict JSON for every reader).
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self, exit_code: int = 0) -> str | None:
        """Close the run (once); returns where an offline W&B run was written (to sync it later)."""
        if not self.enabled or self.jsonl.closed:
            return None
        self.jsonl.close()
        if self.wandb is None:
            return None
        folder = getattr(self.wandb, "dir", None)
        offline = self.wandb.settings.mode == "offline" if hasattr(self.wandb, "settings") else False
        self.wandb.finish(exit_code=exit_code)
        if offline and folder:
            return str(Path(folder).parent)
        return None
