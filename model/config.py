"""One typed config for every knob, loaded from YAML with strict checking (core/typed_config.py):
unknown keys and wrong types are errors that name the key; ``--set section.key=value`` overrides
are parsed as YAML scalars.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.typed_config import ConfigError, apply_override, build, load_yaml, to_dict  # noqa: F401 (re-exported)
from model.encoder import TinyClipSettings
from model.towers import TowersSettings
from moe.layer_spec import check_top_k
from moe.matcher import MatcherSettings

ENCODERS = ("clip", "towers")


@dataclass
class ModelConfig:
    encoder: str = "clip"  # clip: one CLIPModel (the paper's) | towers: a text and a vision tower (model.towers)
    clip_path: str = ""  # local folder or hub id of a CLIPModel; empty: build tiny_clip
    # the random-init CLIP's sizes; with encoder: towers, the sizes of a random-init tower (a path left empty)
    tiny_clip: TinyClipSettings = field(default_factory=TinyClipSettings)
    towers: TowersSettings = field(default_factory=TowersSettings)
    text_max_length: int = 50
    matcher: MatcherSettings = field(default_factory=MatcherSettings)

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ConfigError(f"model.encoder: expected one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "towers" and self.matcher.compat == "published":
            raise ConfigError("model.matcher.compat: published reproduces the published code, which encodes with one "
                              "CLIP: use model.encoder: clip with it")


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
    tokenizer: str = ""  # "": a pretrained text encoder's own, else <shards>/tokenizer, else the encoder's folder
    # Append the (DME) description to the mention text / the entity text. The paper's "w/o DME"
    # ablation removes only the mention's: mention_desc: false.
    mention_desc: bool = True
    entity_desc: bool = True
    batch_size: int = 32  # micro batch per process
    num_workers: int = 2
    shuffle_buffer: int = 1000
    train_fraction: float = 1.0  # low-resource training: a subset of the training mentions
    train_fraction_mode: str = "random"  # random: a seeded subset | first: the first ones in file order (MIMIC)
    seed: int = 0
    verify_checksums: bool = False  # check every shard's size and sha256 against the manifest before training

    def __post_init__(self) -> None:
        if self.train_fraction_mode not in ("random", "first"):
            raise ConfigError(f"data.train_fraction_mode: expected random or first, got {self.train_fraction_mode!r}")


# Storage of the saved/in-memory entity cache (eval/kb_cache.py); defined here so the config
# can validate it without importing eval.
CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")
INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq")  # FAISS first-stage indexes (eval/ranking.py: build_index)


@dataclass
class EvalConfig:
    mode: str = "exact"  # exact | two-stage
    top_k: int = 100  # two-stage: candidates re-ranked by the full matcher
    # FAISS index of two-stage's first stage: auto (flat up to 2^18 entities, ivf above) | flat | ivf | ivfpq;
    # ivf/ivfpq: ivf_lists lists (0: 4 sqrt(KB size)), nprobe of them searched per mention.
    index: str = "auto"
    ivf_lists: int = 0
    nprobe: int = 32
    recall_at: list[int] = field(default_factory=lambda: [10, 50, 100])
    batch_size: int = 64  # encoding batch
    mention_chunk: int = 64  # mentions scored together against the KB
    # Elements of the g2l attention map of one scoring block; 0 = automatic (eval.ranking.pair_budget:
    # a map that stays in a CPU's last-level cache, larger blocks on GPUs).
    max_pair_elements: int = 0
    bf16: bool = True  # on GPUs that support it; CPUs always compute in fp32
    num_workers: int = 2
    # Under model.matcher.compat: published, scores depend on the batch a side is computed in; the
    # published evaluation computes the entity side on blocks of 6,000 KB rows (its eval_chunk_size)
    # and the mention side on batches of 20 mentions (its eval_batch_size).
    compat_entity_block: int = 6000
    compat_mention_batch: int = 20
    # The split's and the KB's shards checked against the manifest before evaluating (training: dev and KB).
    verify_checksums: bool = True
    # The entity cache is stored in this dtype (int8: per-row scales) and expanded to fp32 per scored block.
    cache_dtype: str = "float32"
    # eval.evaluate / eval.link save the entity cache next to the checkpoint and reuse it while its key
    # matches; the trainer's dev evaluation never saves (its weights change).
    save_kb_cache: bool = True
    # Where the entity cache lives on several ranks: "sharded": each rank keeps its own slice of the KB (memory
    # per rank 1/W; the ranks equal the gathered path's, eval/sharded.py); "gathered": every rank the whole KB.
    # compat: published always gathers (its entity blocks span slices).
    kb_sharding: str = "sharded"

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "two-stage"):
            raise ConfigError(f"eval.mode: expected exact or two-stage, got {self.mode!r}")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"eval.index: expected one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        if self.kb_sharding not in ("sharded", "gathered"):
            raise ConfigError(f"eval.kb_sharding: expected sharded or gathered, got {self.kb_sharding!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"eval.cache_dtype: expected one of {CACHE_DTYPES}, got {self.cache_dtype!r}")


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
    epochs: int = 20
    max_steps: int = 0  # optimizer steps; 0 = no limit (epochs decide)
    lr: float = 1e-5  # paper: 5e-6 for WikiMEL, 1e-5 otherwise
    clip_lr: float = -1.0  # encoder learning rate (CLIP, or both towers); < 0: the same as lr (the paper's single rate)
    # model.encoder: towers only: each tower's rate (< 0: clip_lr) and its freezing: lr 0 for its first N optimizer
    # steps (its warm-up then starts), -1: never trained (no gradient through it)
    text_lr: float = -1.0
    vision_lr: float = -1.0
    freeze_text_steps: int = 0
    freeze_vision_steps: int = 0
    encoder_warmup_steps: int = -1  # the encoder groups' warm-up (CLIP or each tower); -1: warmup_steps
    # layer-wise LR decay of the encoder: layer i of L at clip_lr * decay^(L - i), the embeddings at decay^(L + 1),
    # the rest (final norms, pooling heads) at clip_lr; 1 = off
    layer_decay: float = 1.0
    weight_decay: float = 1e-4
    adam_eps: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine (decay after warm-up)
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 = off
    # the encoder's transformer layers keep no activations for backward and recompute them (Hugging Face's
    # activation checkpointing): less memory for large batches, about one more forward of the encoder per step
    activation_checkpointing: bool = False
    # AdamW's implementation: auto (torch's choice: foreach on GPUs, one tensor at a time on CPUs) | fused (one
    # kernel over all tensors, CPU and CUDA; the fastest update measured) | foreach | loop; equal up to rounding
    adamw: str = "auto"
    # torch.compile of the encoder's towers, the matcher or both (none | encoder | matcher | all): a measured option,
    # off by default (docs/training-speed.md: what it bought on our machines)
    compile: str = "none"
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
    # Signals that make every rank stop at the next optimizer step, checkpoint and exit 75 (train/preemption.py).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # A collective that waits longer than this fails on every rank (a dead or hung rank); NCCL's and gloo's own
    # default is 30 minutes. It must exceed the longest wait of one rank for the others (a checkpoint, an export).
    collective_timeout_s: int = 1800

    def __post_init__(self) -> None:
        choices = {"schedule": ("constant", "linear", "cosine"), "precision": ("auto", "bf16", "fp16", "fp32"),
                   "adamw": ("auto", "foreach", "fused", "loop"), "compile": ("none", "encoder", "matcher", "all")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"train.{key}: expected one of {allowed}, got {getattr(self, key)!r}")
        check_run_name(self.run_name)
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage: expected 0, 1 or 2, got {self.zero_stage}")
        for name in self.stop_signals:
            if name not in STOP_SIGNALS:
                raise ConfigError(f"train.stop_signals: {name!r} is not one of {', '.join(STOP_SIGNALS)}")


@dataclass
class NegativesConfig:
    """Hard negatives mined with FAISS (train/negatives.py)."""

    enabled: bool = False
    warmup_epochs: int = 1  # first mining before this epoch (0: before training starts)
    refresh_epochs: int = 2  # mine again every R epochs; 0 = never refresh
    top_k: int = 50  # neighbours kept per mention
    n_hard: int = 1  # negatives attached to each mention (shared by the whole batch)
    strategy: str = "top"  # top: the best-ranked; random: a seeded draw within the top-K
    index: str = "flat"  # flat (exact) | ivf | ivfpq | auto (eval.index)
    from_file: str = ""  # a table from `python -m train.negatives`, used from the first epoch

    def __post_init__(self) -> None:
        if self.strategy not in ("top", "random"):
            raise ConfigError(f"negatives.strategy: expected top or random, got {self.strategy!r}")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"negatives.index: expected one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
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


# The allowed range of every numeric config field (a list field: of each element), as (low, high, kind):
# kind "[]" closed, "(]" low excluded, "[)" high excluded; None = unbounded on that side. NaN passes no
# range. tests/test_loss_and_config.py checks that every int/float field of Config is listed here.
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "model.text_max_length": (1, None, "[]"),
    **{f"model.tiny_clip.{k}": (0, None, "[]") for k in ("vocab_size", "seed")},  # vocab 0: from the tokenizer
    **{f"model.tiny_clip.{k}_token_id": (-1, None, "[]") for k in ("bos", "eos", "pad")},  # -1: from the tokenizer
    **{f"model.tiny_clip.{k}": (1, None, "[]") for k in ("text_hidden", "vision_hidden", "layers", "heads", "image_size",
                                                          "patch_size", "projection_dim", "max_text_positions")},
    **{f"model.matcher.{k}": (1, None, "[]") for k in ("text_dim", "image_dim", "hidden", "cross_dim")},
    **{f"model.matcher.moe.{k}": (1, None, "[]") for k in ("num_experts", "top_k", "expert_mult", "ep_size")},
    "model.matcher.moe.min_capacity": (0, None, "[]"),
    **{f"model.matcher.moe.{k}": (0, None, "(]") for k in ("capacity_factor", "eval_capacity_factor")},
    **{f"loss.{k}": (0, None, "[]") for k in ("overall_weight", "text_weight", "vision_weight", "cross_weight", "aux_coef",
                                              "z_coef")},
    "data.batch_size": (1, None, "[]"),
    "data.num_workers": (0, None, "[]"),
    "data.shuffle_buffer": (1, None, "[]"),
    "data.train_fraction": (0, 1, "(]"),
    "data.seed": (0, None, "[]"),
    **{f"eval.{k}": (1, None, "[]") for k in ("top_k", "recall_at", "batch_size", "mention_chunk",
                                              "compat_entity_block", "compat_mention_batch", "nprobe")},
    "eval.num_workers": (0, None, "[]"),
    "eval.ivf_lists": (0, None, "[]"),  # 0: 4 sqrt(KB size)
    "eval.max_pair_elements": (0, None, "[]"),
    **{f"train.{k}": (1, None, "[]") for k in ("epochs", "grad_accum", "log_every")},
    **{f"train.{k}": (0, None, "[]") for k in ("max_steps", "weight_decay", "warmup_steps", "grad_clip", "zero_stage",
                                               "eval_every_epochs", "eval_every_steps", "patience", "save_every_steps",
                                               "keep_checkpoints", "seed", "max_bad_steps")},
    "train.collective_timeout_s": (1, None, "[]"),
    **{f"train.{k}": (0, None, "(]") for k in ("lr", "adam_eps")},
    **{f"train.{k}": (None, None, "[]") for k in ("clip_lr", "text_lr", "vision_lr")},  # < 0: inherited; 0 freezes
    **{f"train.{k}": (-1, None, "[]") for k in ("freeze_text_steps", "freeze_vision_steps", "encoder_warmup_steps")},
    "train.layer_decay": (0, 1, "(]"),
    "train.adam_betas": (0, 1, "[)"),
    **{f"negatives.{k}": (0, None, "[]") for k in ("warmup_epochs", "refresh_epochs")},
    **{f"negatives.{k}": (1, None, "[]") for k in ("top_k", "n_hard")},
}


def _in_range(value: float, low: float | None, high: float | None, kind: str) -> bool:
    if not math.isfinite(value):
        return False
    if low is not None and (value < low or (kind == "(]" and value == low)):
        return False
    return high is None or value < high or (value == high and kind != "[)")


def _describe(low: float | None, high: float | None, kind: str) -> str:
    if high is None:
        return "a finite number" if low is None else f"{'>' if kind == '(]' else '>='} {low:g}"
    return f"in {'(' if kind == '(]' else '['}{low:g}, {high:g}{')' if kind == '[)' else ']'}"


def check_ranges(cfg: Config) -> None:
    """Every numeric field within its range (RANGES) and the cross-field constraints; ConfigError names the key."""
    for key, (low, high, kind) in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            if not math.isfinite(v):  # set in code (YAML values are refused while parsing)
                raise ConfigError(f"{where}: must be a finite number, got {v!r}")
            if not _in_range(v, low, high, kind):
                raise ConfigError(f"{where}: must be {_describe(low, high, kind)}, got {v!r}")
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
