"""What the trainer builds and checks before its first step: seeds, the resolved precision, the DeepSpeed engine
around ``GuardedAdamW`` and its learning-rate schedule, the train/dev data checks."""

from __future__ import annotations

import random

import numpy as np
import torch

from data_shards.folder import ShardFolder
from data_shards.store import ShardError
from model import distributed as D
from model.config import Config
from train.checkpoint_manager import RunSetupError
from train.optim_groups import freeze, frozen_towers, group_lr_factors, param_groups
from train.step_guard import GuardedAdamW

# train.adamw -> torch.optim.AdamW's implementation; auto is torch's own choice (docs/training-speed.md: fused is
# faster but moved the demo's result, so it is an option)
ADAMW_KWARGS = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True},
                "loop": {"foreach": False, "fused": False}}


def resolve_precision(requested: str) -> str:
    if requested in ("bf16", "fp16") and not torch.cuda.is_available():
        # Our layers compute in fp32 on CPUs (DESIGN: bf16 pays only with AMX); DeepSpeed would then fail deep in
        # a LayerNorm with "mixed dtype (CPU)".
        raise RunSetupError(f"train.precision={requested} needs a GPU; on CPUs train in fp32 (train.precision=auto)")
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: Config, precision: str) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # our torch AdamW (no fused-kernel build needed)
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(model: torch.nn.Module, cfg: Config, precision: str, total_steps: int) -> tuple:
    """Freeze the towers train.freeze names, then DeepSpeed's engine around GuardedAdamW (the parameter groups
    of train/optim_groups.py) and its schedule over ``total_steps``: (engine, the client optimizer, the
    engine's scheduler)."""
    import deepspeed

    freeze(model, frozen_towers(cfg))
    groups = param_groups(model, cfg)
    optimizer = GuardedAdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                             eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay,
                             **ADAMW_KWARGS[cfg.train.adamw])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, group_lr_factors(groups, cfg, total_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, precision))
    return engine, optimizer, scheduler


def check_data(cfg: Config, folder: ShardFolder) -> None:
    """Refuse a missing or empty train/dev split by name, and shards that differ from the manifest, before
    anything is trained: the dev and KB shards (eval.verify_checksums, on by default: the dev numbers choose
    the best model and stop training early), or every shard (data.verify_checksums)."""
    counts = folder.counts
    for split in ("train", "dev"):
        if not counts.get(split):
            state = "empty" if split in counts else "missing (not converted)"
            raise RunSetupError(f"the {split} split of {cfg.data.shards} is {state}: training needs {split} mentions")
    shares = dict(rank=D.rank(), world=D.world(), gather=D.gather_objects)  # the files shared over the ranks
    try:
        if cfg.data.verify_checksums:
            folder.verify(None, "data.verify_checksums", **shares)
        elif cfg.eval.verify_checksums:
            folder.verify(["kb", "dev"], "set eval.verify_checksums=false to train anyway", **shares)
    except ShardError as err:
        raise RunSetupError(str(err)) from None
