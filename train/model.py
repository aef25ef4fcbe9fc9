"""MMoE model = CLIP encoder + matcher, with the batch layout the data loaders produce.

A batch (mentions or entities) is a mapping with
  input_ids [B, Lt] long, attention_mask [B, Lt], pixel_values [B, 3, S, S] float,
  image_mask [B] bool (False: the input has no image; its pixel row is ignored).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from moe.features import Features, SideCache
from moe.matcher import MMoEMatcher
from moe.units import MoELog
from train import distributed as D
from train.config import Config, ModelConfig, apply_override, build, load_config, save_config, to_dict
from train.encoder import ClipEncoder, load_clip

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_mask")


class MMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.matcher
        self.encoder = ClipEncoder(load_clip(cfg.clip_path, cfg.tiny_clip), s.text_dim, s.image_dim)
        self.matcher = MMoEMatcher(s)

    def features(self, batch: Mapping[str, Tensor]) -> Features:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; a batch needs {BATCH_KEYS}")
        return self.encoder(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_mask"])

    def mention_side(self, batch: Mapping[str, Tensor]) -> tuple[SideCache, MoELog]:
        return self.matcher.mention_side(self.features(batch))

    def entity_side(self, batch: Mapping[str, Tensor]) -> tuple[SideCache, MoELog]:
        return self.matcher.entity_side(self.features(batch))

    def forward(self, mentions: Mapping[str, Tensor], entities: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], MoELog]:
        """Scores of every mention against every entity of the batch (gold entities first,
        then any extra negatives), per unit and overall, plus the MoE log of both sides."""
        m_side, m_log = self.mention_side(mentions)
        e_side, e_log = self.entity_side(entities)
        m_log.merge(e_log)
        return self.matcher.score(m_side, e_side), m_log


class ModelSetupError(ValueError):
    """The tokenizer and the model do not fit together; the message says what to do."""


def build_model(cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[MMoEModel, Config]:
    """Build the model; a tiny CLIP takes its vocabulary size and special tokens from the
    tokenizer. Returns the config with those values filled in (save that one)."""
    cfg = copy.deepcopy(cfg)
    tiny = cfg.model.tiny_clip
    if not cfg.model.clip_path and tokenizer is not None:
        if tiny.vocab_size <= 0:
            tiny.vocab_size = len(tokenizer)
        # A BERT-style tokenizer has [CLS]/[SEP] instead of bos/eos; the encoder pools at the last real
        # token, so a [SEP] that is both the separator and the eos is fine.
        fallback = {"bos": "cls", "eos": "sep", "pad": None}
        for name in ("bos", "eos", "pad"):
            attr = f"{name}_token_id"
            if getattr(tiny, attr) < 0:
                value = getattr(tokenizer, attr)
                if value is None and fallback[name]:
                    value = getattr(tokenizer, f"{fallback[name]}_token_id", None)
                if value is None:
                    alt = f" (or {fallback[name]})" if fallback[name] else ""
                    raise ModelSetupError(
                        f"the tokenizer has no {name}{alt} token, which the tiny CLIP needs: set {name}_token in its "
                        "tokenizer_config.json, set model.tiny_clip." + attr + ", or build a word-level tokenizer "
                        "from the dataset with python -m data_shards.tokenizer --root DATASET --out DATASET/tokenizer")
                setattr(tiny, attr, value)
    model = MMoEModel(cfg.model)
    vocab = model.encoder.clip.config.text_config.vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ModelSetupError(f"the tokenizer has {len(tokenizer)} tokens but the CLIP text model only {vocab}: use the "
                         "tokenizer the CLIP was trained with (data.tokenizer), or leave model.clip_path empty")
    return model, cfg


EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"


def _deepspeed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The DeepSpeed-backend switch layers (moe.deepspeed_backend), in module order (the same on every rank)."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "backend", None) == "deepspeed"]


def local_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights on CPU in the local layout: every switch layer as stacked ``wg.weight, w1,
    b1, w2, b2`` with all of its experts (mapping: moe/expert_layout.py). For DeepSpeed MoE layers with
    ep_size > 1 this gathers the experts over each expert-parallel group: call it on every rank."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, layer in _deepspeed_layers(model):
        prefix = name + "."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update({prefix + k: v for k, v in layer.gathered_local_state().items()})
    return {k: v.cpu().contiguous() for k, v in state.items()}


@contextmanager
def local_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every DeepSpeed MoE layer of ``model`` is swapped for a ``SwitchMoE`` holding
    all of its experts, so ranks may run different numbers of batches (evaluation, KB encoding, mining)
    with no all-to-all. Entering gathers the experts (a collective when ep_size > 1: every rank enters);
    the copies are for inference (training them does not reach the DeepSpeed layers), and the original
    layers come back on exit. A model without DeepSpeed layers is yielded unchanged."""
    swaps = []
    for name, layer in _deepspeed_layers(model):
        parent_name, _, attr = name.rpartition(".")
        swaps.append((model.get_submodule(parent_name) if parent_name else model, attr, layer, layer.to_local()))
    try:
        for parent, attr, _, local in swaps:
            setattr(parent, attr, local)
        yield model
    finally:
        for parent, attr, layer, _ in swaps:
            setattr(parent, attr, layer)


def export_config(cfg: Config) -> Config:
    """The config an export is saved with: its weights are in the local layout, loadable on one process."""
    cfg = copy.deepcopy(cfg)
    cfg.model.matcher.moe.backend, cfg.model.matcher.moe.ep_size = "local", 1
    return cfg


def save_export(model: MMoEModel, cfg: Config, out_dir: str | Path) -> Path:
    """A self-contained copy of the model (weights + resolved config) that evaluation loads
    without DeepSpeed; written to a temporary folder and renamed, so it is never half-written.

    Always in the local layout (``model.matcher.moe.backend: local``), whatever the training backend.
    With expert-parallel DeepSpeed MoE layers (ep_size > 1) call it on every rank: the experts are
    gathered over each expert-parallel group and rank 0 writes. Otherwise rank 0 alone may call it."""
    state = local_state_dict(model)
    out_dir = Path(out_dir)
    if not D.is_main():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / EXPORT_WEIGHTS))
    save_config(export_config(cfg), tmp / EXPORT_CONFIG)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load_export(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MMoEModel, Config]:
    path = Path(path)
    if not (path / EXPORT_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} holds no {EXPORT_WEIGHTS}: pass a model export (runs/NAME/best) or a checkpoint folder")
    cfg = export_config(load_config(path / EXPORT_CONFIG))  # exports hold the local layout
    model = MMoEModel(cfg.model)
    missing, unexpected = model.load_state_dict(load_file(str(path / EXPORT_WEIGHTS), device=str(map_location)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model, cfg



def load_export_for_command(checkpoint: str | Path, settings: list[str], config: str | Path | None = None,
                            sections: tuple[str, ...] = ("data", "eval", "negatives")) -> tuple[MMoEModel, Config]:
    """An export for a command-line tool: ``config``'s ``sections`` replace the export's (the model
    section always comes from the export, since it must fit the weights), then ``settings``
    (``section.key=value``) apply. Errors are ConfigError/FileNotFoundError/ValueError."""
    model, cfg = load_export(checkpoint)
    data = to_dict(cfg)
    if config:
        other = to_dict(load_config(config))
        for section in sections:
            data[section] = other[section]
    for assignment in settings:
        apply_override(data, assignment)
    return model, build(Config, data)

