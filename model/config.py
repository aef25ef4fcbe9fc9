"""One typed config for every knob, loaded from YAML with strict checking (core/typed_config.py):
unknown keys and wrong types are errors that name the key; ``--set section.key=value`` overrides
are parsed as YAML scalars.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from core.typed_config import (  # noqa: F401 (re-exported)
    ConfigError,
    apply_override,
    build,
    check_choices,
    check_field_ranges,
    load_yaml,
    ranged,
    to_dict,
)
from model.encoder import TinyClipSettings
from model.towers import TowersSettings
from moe.layer_spec import check_top_k
from moe.matcher import MatcherSettings

# Choices are Literal field types and ranges are ranged() fields (core/typed_config.py checks both: the
# choices when a section is built, the ranges once the whole Config is); every int/float field declares a
# range or choices (tests/unit/test_loss_and_config.py). Constraints between fields are the code below.

@dataclass
class ModelConfig:
    # clip: one CLIPModel (the paper's) | towers: a text and a vision tower (model.towers)
    encoder: Literal["clip", "towers"] = "clip"
    clip_path: str = ""  # local folder or hub id of a CLIPModel; empty: build tiny_clip
    # the random-init CLIP's sizes; with encoder: towers, the sizes of a random-init tower (a path left empty)
    tiny_clip: TinyClipSettings = field(default_factory=TinyClipSettings)
    towers: TowersSettings = field(default_factory=TowersSettings)
    text_max_length: int = ranged(50, 1)
    matcher: MatcherSettings = field(default_factory=MatcherSettings)

    def __post_init__(self) -> None:
        check_choices(self, "model.")
        if self.encoder == "towers" and self.matcher.compat == "published":
            raise ConfigError("model.matcher.compat: published reproduces the published code, which encodes with one "
                              "CLIP: use model.encoder: clip with it")


@dataclass
class LossConfig:
    """In-batch contrastive cross-entropy per head, summed with these weights, plus MoE losses."""

    overall_weight: float = ranged(1.0, 0)
    text_weight: float = ranged(1.0, 0)
    vision_weight: float = ranged(1.0, 0)
    cross_weight: float = ranged(1.0, 0)
    aux_coef: float = ranged(0.01, 0)  # Switch-style load balancing
    z_coef: float = ranged(0.001, 0)  # router z-loss (ST-MoE)
    mask_duplicate_golds: bool = True  # the published code treats them as negatives


@dataclass
class DataConfig:
    shards: str = "data/synthetic/shards"  # output folder of data_shards.convert
    tokenizer: str = ""  # "": a pretrained text encoder's own, else <shards>/tokenizer, else the encoder's folder
    # Append the (DME) description to the mention text / the entity text. The paper's "w/o DME"
    # ablation removes only the mention's: mention_desc: false.
    mention_desc: bool = True
    entity_desc: bool = True
    batch_size: int = ranged(32, 1)  # micro batch per process
    num_workers: int = ranged(2, 0)
    shuffle_buffer: int = ranged(1000, 1)
    train_fraction: float = ranged(1.0, 0, 1, "(]")  # low-resource training: a subset of the training mentions
    # random: a seeded subset | first: the first ones in file order (MIMIC)
    train_fraction_mode: Literal["random", "first"] = "random"
    seed: int = ranged(0, 0)
    verify_checksums: bool = False  # check every shard's size and sha256 against the manifest before training

    def __post_init__(self) -> None:
        check_choices(self, "data.")


# The entity cache's storage dtypes (eval/kb_cache.py) and the FAISS first-stage indexes (eval/ranking.py:
# build_index): their one definition, here at the config's floor, which eval imports.
CacheDtype = Literal["float32", "bfloat16", "float16", "int8"]
CACHE_DTYPES = typing.get_args(CacheDtype)
IndexKind = Literal["auto", "flat", "ivf", "ivfpq"]
INDEX_KINDS = typing.get_args(IndexKind)
CompileParts = Literal["none", "encoder", "matcher", "all"]  # train.compile; MMoEModel.compile_parts


@dataclass
class EvalConfig:
    mode: Literal["exact", "two-stage"] = "exact"
    top_k: int = ranged(100, 1)  # two-stage: candidates re-ranked by the full matcher
    # FAISS index of two-stage's first stage: auto (flat up to 2^18 entities, ivf above) | flat | ivf | ivfpq;
    # ivf/ivfpq: ivf_lists lists (0: 4 sqrt(KB size)), nprobe of them searched per mention.
    index: IndexKind = "auto"
    ivf_lists: int = ranged(0, 0)
    nprobe: int = ranged(32, 1)
    recall_at: list[int] = ranged([10, 50, 100], 1)
    batch_size: int = ranged(64, 1)  # encoding batch
    mention_chunk: int = ranged(64, 1)  # mentions scored together against the KB
    # Elements of the g2l attention map of one scoring block; 0 = automatic (eval.ranking.pair_budget:
    # a map that stays in a CPU's last-level cache, larger blocks on GPUs).
    max_pair_elements: int = ranged(0, 0)
    bf16: bool = True  # on GPUs that support it; CPUs always compute in fp32
    num_workers: int = ranged(2, 0)
    # Under model.matcher.compat: published, scores depend on the batch a side is computed in; the
    # published evaluation computes the entity side on blocks of 6,000 KB rows (its eval_chunk_size)
    # and the mention side on batches of 20 mentions (its eval_batch_size).
    compat_entity_block: int = ranged(6000, 1)
    compat_mention_batch: int = ranged(20, 1)
    # The split's and the KB's shards checked against the manifest before evaluating (training: dev and KB).
    verify_checksums: bool = True
    # The entity cache is stored in this dtype (int8: per-row scales) and expanded to fp32 per scored block.
    cache_dtype: CacheDtype = "float32"
    # eval.evaluate / eval.link save the entity cache next to the checkpoint and reuse it while its key
    # matches; the trainer's dev evaluation never saves (its weights change).
    save_kb_cache: bool = True
    # Where the entity cache lives on several ranks: "sharded": each rank keeps its own slice of the KB (memory
    # per rank 1/W; the ranks equal the gathered path's, eval/sharded.py); "gathered": every rank the whole KB.
    # compat: published always gathers (its entity blocks span slices).
    kb_sharding: Literal["sharded", "gathered"] = "sharded"

    def __post_init__(self) -> None:
        check_choices(self, "eval.")


# A run name is one folder under train.out_dir: a single path component of sane characters and length
# (launch/seeds.py appends -seed<S> and -seeds, which stays far below the file systems' 255 bytes).
RUN_NAME_MAX = 100
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(name: str, key: str = "train.run_name") -> None:
    """ConfigError unless ``name`` is letters, digits and . _ -, starts with a letter or digit, at most RUN_NAME_MAX long."""
    if len(name) > RUN_NAME_MAX or not _RUN_NAME.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + f"... ({len(name)} characters)"
        raise ConfigError(f"{key}: {shown!r} is not a run name: use letters, digits and . _ - only, starting with a letter "
                          f"or digit, at most {RUN_NAME_MAX} characters (the run is the folder train.out_dir/NAME)")


# Signals a trainer may take as a stop request (SIGKILL and SIGSTOP cannot be caught). SIGINT is not a default:
# Ctrl-C stays an immediate stop unless it is listed.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGXCPU")


@dataclass
class TrainConfig:
    run_name: str = "run"
    out_dir: str = "runs"  # the run lives in out_dir/run_name
    epochs: int = ranged(20, 1)
    max_steps: int = ranged(0, 0)  # optimizer steps; 0 = no limit (epochs decide)
    lr: float = ranged(1e-5, 0, kind="(]")  # paper: 5e-6 for WikiMEL, 1e-5 otherwise
    # encoder learning rate (CLIP, or both towers); < 0: the same as lr (the paper's single rate); any finite number
    clip_lr: float = ranged(-1.0)
    # model.encoder: towers only: each tower's rate (< 0: clip_lr) and its freezing: lr 0 for its first N optimizer
    # steps (its warm-up then starts), -1: never trained (no gradient through it)
    text_lr: float = ranged(-1.0)
    vision_lr: float = ranged(-1.0)
    freeze_text_steps: int = ranged(0, -1)
    freeze_vision_steps: int = ranged(0, -1)
    encoder_warmup_steps: int = ranged(-1, -1)  # the encoder groups' warm-up (CLIP or each tower); -1: warmup_steps
    # layer-wise LR decay of the encoder: layer i of L at clip_lr * decay^(L - i), the embeddings at decay^(L + 1),
    # the rest (final norms, pooling heads) at clip_lr; 1 = off
    layer_decay: float = ranged(1.0, 0, 1, "(]")
    weight_decay: float = ranged(1e-4, 0)
    adam_eps: float = ranged(1e-4, 0, kind="(]")
    adam_betas: list[float] = ranged([0.9, 0.999], 0, 1, "[)")
    warmup_steps: int = ranged(0, 0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # decay after warm-up
    grad_accum: int = ranged(1, 1)
    grad_clip: float = ranged(1.0, 0)  # 0 = off
    # the encoder's transformer layers keep no activations for backward and recompute them (Hugging Face's
    # activation checkpointing): less memory for large batches, about one more forward of the encoder per step
    activation_checkpointing: bool = False
    # AdamW's implementation: auto (torch's choice: foreach on GPUs, one tensor at a time on CPUs) | fused (one
    # kernel over all tensors, CPU and CUDA; the fastest update measured) | foreach | loop; equal up to rounding
    adamw: Literal["auto", "foreach", "fused", "loop"] = "auto"
    # torch.compile of the encoder's towers, the matcher or both: a measured option, off by default
    # (docs/training-speed.md: what it bought on our machines)
    compile: CompileParts = "none"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs that support it, else fp32
    zero_stage: Literal[0, 1, 2] = 0
    eval_every_epochs: int = ranged(2, 0)  # paper: dev check every 2 epochs
    eval_every_steps: int = ranged(0, 0)  # > 0: also (or instead) every N optimizer steps
    patience: int = ranged(3, 0)  # evaluations without dev MRR improvement before stopping; 0 = never stop early
    save_every_steps: int = ranged(0, 0)  # > 0: resumable checkpoint every N steps (and always after a dev evaluation)
    keep_checkpoints: int = ranged(2, 0)  # resumable checkpoints kept on disk (the best export is kept apart)
    log_every: int = ranged(10, 1)
    seed: int = ranged(0, 0)
    test_at_end: bool = True  # evaluate the best checkpoint on test and print the leaderboard
    # optimizer steps with a non-finite loss or gradient norm skipped (and counted) before stopping
    max_bad_steps: int = ranged(0, 0)
    # Signals that make every rank stop at the next optimizer step, checkpoint and exit 75 (train/preemption.py).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # A collective that waits longer than this fails on every rank (a dead or hung rank); NCCL's and gloo's own
    # default is 30 minutes. It must exceed the longest wait of one rank for the others (a checkpoint, an export).
    collective_timeout_s: int = ranged(1800, 1)

    def __post_init__(self) -> None:
        check_choices(self, "train.")
        check_run_name(self.run_name)
        for name in self.stop_signals:  # a list of names: its own message (tests/unit/test_preemption.py)
            if name not in STOP_SIGNALS:
                raise ConfigError(f"train.stop_signals: {name!r} is not one of {', '.join(STOP_SIGNALS)}")


@dataclass
class NegativesConfig:
    """Hard negatives mined with FAISS (train/negatives.py)."""

    enabled: bool = False
    warmup_epochs: int = ranged(1, 0)  # first mining before this epoch (0: before training starts)
    refresh_epochs: int = ranged(2, 0)  # mine again every R epochs; 0 = never refresh
    top_k: int = ranged(50, 1)  # neighbours kept per mention
    n_hard: int = ranged(1, 1)  # negatives attached to each mention (shared by the whole batch)
    strategy: Literal["top", "random"] = "top"  # top: the best-ranked; random: a seeded draw within the top-K
    index: IndexKind = "flat"  # flat (exact) | ivf | ivfpq | auto (eval.index)
    from_file: str = ""  # a table from `python -m train.negatives`, used from the first epoch

    def __post_init__(self) -> None:
        check_choices(self, "negatives.")
        if self.n_hard > self.top_k:
            raise ConfigError(f"negatives.n_hard ({self.n_hard}) cannot exceed negatives.top_k ({self.top_k})")


@dataclass
class WandbConfig:
    # auto: online with an API key, offline without | online | offline | disabled
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "mmoe-mel"
    entity: str = ""
    tags: list[str] = field(default_factory=list)
    dir: str = ""  # default: the run folder

    def __post_init__(self) -> None:
        check_choices(self, "wandb.")


def check_ranges(cfg: Config) -> None:
    """Every ranged() field within its range (core/typed_config.py), then the constraints between fields;
    ConfigError names the key."""
    check_field_ranges(cfg)
    moe, tiny, t = cfg.model.matcher.moe, cfg.model.tiny_clip, cfg.train
    check_top_k(moe.top_k, moe.num_experts)  # after the ranges: num_experts >= 1 first
    if tiny.patch_size > tiny.image_size:
        raise ConfigError(f"model.tiny_clip.patch_size ({tiny.patch_size}) cannot exceed model.tiny_clip.image_size "
                          f"({tiny.image_size})")
    tower_knobs = {"text_lr": -1.0, "vision_lr": -1.0, "freeze_text_steps": 0, "freeze_vision_steps": 0}
    changed = [k for k, default in tower_knobs.items() if getattr(t, k) != default]
    if changed and cfg.model.encoder != "towers":
        raise ConfigError(f"train.{changed[0]} applies to model.encoder: towers; the CLIP encoder is one group "
                          "(train.clip_lr, 0 freezes it)")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"train.adam_betas: expected two numbers [beta1, beta2], got {t.adam_betas}")
    heads = ("overall_weight", "text_weight", "vision_weight", "cross_weight")
    if not any(getattr(cfg.loss, h) > 0 for h in heads):
        raise ConfigError(f"loss: at least one of {', '.join(heads)} must be > 0 (nothing would be learned)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        check_ranges(self)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    return build(Config, load_yaml(path, overrides))
