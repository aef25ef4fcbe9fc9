"""One typed config for every knob, loaded from YAML with strict checking (train/typed_config.py):
unknown keys and wrong types are errors that name the key; ``--set section.key=value`` overrides
are parsed as YAML scalars.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moe.matcher import MatcherSettings
from train.encoder import TinyClipSettings
from train.typed_config import ConfigError, apply_override, build, load_yaml, to_dict  # noqa: F401 (re-exported)


@dataclass
class ModelConfig:
    clip_path: str = ""  # local folder or hub id of a CLIPModel; empty: build tiny_clip
    tiny_clip: TinyClipSettings = field(default_factory=TinyClipSettings)
    text_max_length: int = 50
    matcher: MatcherSettings = field(default_factory=MatcherSettings)


@dataclass
class LossConfig:
    """In-batch contrastive cross-entropy per head, summed with these weights, plus MoE losses."""

    overall_weight: float = 1.0
    text_weight: float = 1.0
    vision_weight: float = 1.0
    cross_weight: float = 1.0
    aux_coef: float = 0.01  # Switch-style load balancing
    z_coef: float = 0.001  # router z-loss (ST-MoE)
    mask_duplicate_golds: bool = True  # the published code treats them as negatives


@dataclass
class DataConfig:
    shards: str = "data/synthetic/shards"  # output folder of data_shards.convert
    tokenizer: str = ""  # "": <shards>/tokenizer if present, else model.clip_path
    use_desc: bool = True  # append the (DME) description to mention and entity texts
    batch_size: int = 32  # micro batch per process
    num_workers: int = 2
    shuffle_buffer: int = 1000
    train_fraction: float = 1.0  # low-resource training: a seeded subset of the training mentions
    seed: int = 0


@dataclass
class EvalConfig:
    mode: str = "exact"  # exact | two-stage
    top_k: int = 100  # two-stage: candidates re-ranked by the full matcher
    index: str = "flat"  # FAISS index for two-stage: flat | ivf | ivfpq
    recall_at: list[int] = field(default_factory=lambda: [10, 50, 100])
    batch_size: int = 64  # encoding batch
    mention_chunk: int = 64  # mentions scored together against the KB
    max_pair_elements: int = 1 << 26  # bound on the attention tensor of one scoring block
    bf16: bool = True  # on GPUs that support it; CPUs always compute in fp32
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "two-stage"):
            raise ConfigError(f"eval.mode: expected exact or two-stage, got {self.mode!r}")


@dataclass
class TrainConfig:
    run_name: str = "run"
    out_dir: str = "runs"  # the run lives in out_dir/run_name
    epochs: int = 20
    max_steps: int = 0  # optimizer steps; 0 = no limit (epochs decide)
    lr: float = 1e-5  # paper: 5e-6 for WikiMEL, 1e-5 otherwise
    clip_lr: float = -1.0  # CLIP encoder learning rate; < 0: the same as lr (the paper's single rate)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine (decay after warm-up)
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | bf16 | fp16 | fp32
    zero_stage: int = 0  # 0, 1 or 2
    eval_every_epochs: int = 2  # paper: dev check every 2 epochs
    eval_every_steps: int = 0  # > 0: also (or instead) every N optimizer steps
    patience: int = 3  # evaluations without dev MRR improvement before stopping; 0 = never stop early
    save_every_steps: int = 0  # > 0: resumable checkpoint every N steps (and always after a dev evaluation)
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk (the best export is kept apart)
    log_every: int = 10
    seed: int = 0
    test_at_end: bool = True  # evaluate the best checkpoint on test and print the leaderboard
    max_bad_steps: int = 0  # optimizer steps with a non-finite loss or gradient norm skipped (and counted) before stopping

    def __post_init__(self) -> None:
        choices = {"schedule": ("constant", "linear", "cosine"), "precision": ("auto", "bf16", "fp16", "fp32")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"train.{key}: expected one of {allowed}, got {getattr(self, key)!r}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage: expected 0, 1 or 2, got {self.zero_stage}")


@dataclass
class NegativesConfig:
    """Hard negatives mined with FAISS (train/negatives.py)."""

    enabled: bool = False
    warmup_epochs: int = 1  # first mining before this epoch (0: before training starts)
    refresh_epochs: int = 2  # mine again every R epochs; 0 = never refresh
    top_k: int = 50  # neighbours kept per mention
    n_hard: int = 1  # negatives attached to each mention (shared by the whole batch)
    strategy: str = "top"  # top: the best-ranked; random: a seeded draw within the top-K
    index: str = "flat"  # flat (exact) | ivf | ivfpq
    from_file: str = ""  # a table from `python -m train.negatives`, used from the first epoch

    def __post_init__(self) -> None:
        if self.strategy not in ("top", "random"):
            raise ConfigError(f"negatives.strategy: expected top or random, got {self.strategy!r}")
        if self.index not in ("flat", "ivf", "ivfpq"):
            raise ConfigError(f"negatives.index: expected flat, ivf or ivfpq, got {self.index!r}")
        if self.n_hard > self.top_k:
            raise ConfigError(f"negatives.n_hard ({self.n_hard}) cannot exceed negatives.top_k ({self.top_k})")


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto: online with an API key, offline without | online | offline | disabled
    project: str = "mmoe-mel"
    entity: str = ""
    tags: list[str] = field(default_factory=list)
    dir: str = ""  # default: the run folder

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "online", "offline", "disabled"):
            raise ConfigError(f"wandb.mode: expected auto, online, offline or disabled, got {self.mode!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    return build(Config, load_yaml(path, overrides))
