"""Two separate towers as the encoder (``model.encoder: towers``): a text tower and a vision tower, each any
Hugging Face model folder ``AutoModel`` loads, or a small random-init one (BERT-style text, ViT vision) built
from ``model.tiny_clip``'s sizes for tests and the demo.

text_global   = Linear(pool(text last hidden states))     [B, dt]   (Identity if the width is dt already)
text_tokens   = Linear(text last hidden states)           [B, Lt, dt]
image_global  = Linear(pool(vision last hidden states))   [B, dv]
image_tokens  = Linear(vision last hidden states)         [B, Lv, dv]

Pooling (``text_pooling`` / ``vision_pooling``): ``auto`` is the model's own rule: a sentence-transformers
folder's ``1_Pooling/config.json`` (all-MiniLM-L6-v2: mean), else the model's ``pooler_output`` when it
returns one (BERT: tanh over [CLS]; CLIP text: the eos token; CLIP vision: the normalised class token;
SigLIP: its attention head), else the first token (DINOv2: the normalised class token); ``cls`` (the first
real token), ``mean`` (over real tokens), ``last`` (the last real token: decoder-only text models) or
``pooler`` choose one. Padding never enters a pooled vector, whichever side the tokenizer pads.
A folder holding a dual model (CLIP, SigLIP) gives its text or vision half.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import AutoModel, BertConfig, BertModel, ViTConfig, ViTModel

from core.typed_config import ConfigError, check_choices
from model.encoder import TinyClipSettings, pool_last_token
from moe.features import Features

Pooling = Literal["auto", "cls", "mean", "last", "pooler"]
VisionPooling = Literal["auto", "cls", "mean", "pooler"]


@dataclass
class TowersSettings:
    """``model.towers``: the two towers of ``model.encoder: towers``."""

    text_path: str = ""  # a local Hugging Face model folder (BERT, RoBERTa, MiniLM, XLM-R...); "": random-init BERT
    vision_path: str = ""  # a local folder (ViT, CLIP or SigLIP vision, DINOv2...); "": random-init ViT
    text_pooling: Pooling = "auto"
    vision_pooling: VisionPooling = "auto"

    def __post_init__(self) -> None:
        check_choices(self, "model.towers.")


def _half(model: nn.Module, side: str) -> nn.Module:
    """A dual model's text or vision half (CLIP, SigLIP: ``text_model`` / ``vision_model``), else the model."""
    other = "vision_model" if side == "text_model" else "text_model"
    if hasattr(model, side) and hasattr(model, other):
        return getattr(model, side)
    return model


def load_tower(path: str, side: str) -> nn.Module:
    """The tower in ``path`` (``side``: ``text_model`` or ``vision_model``)."""
    try:
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise OSError(f"could not load the {side.split('_')[0]} tower from {path!r}: give a local folder holding "
                      "config.json and the weights that transformers' AutoModel loads, or leave "
                      f"model.towers.{side.split('_')[0]}_path empty for a random-init tower") from err
    return _half(model, side)


def tiny_text_tower(tiny: TinyClipSettings) -> BertModel:
    if tiny.vocab_size <= 0 or tiny.pad_token_id < 0:
        raise ValueError("a random-init text tower needs model.tiny_clip.vocab_size and pad_token_id (build_model "
                         "takes them from the tokenizer)")
    config = BertConfig(vocab_size=tiny.vocab_size, hidden_size=tiny.text_hidden, num_hidden_layers=tiny.layers,
                        num_attention_heads=tiny.heads, intermediate_size=4 * tiny.text_hidden,
                        max_position_embeddings=tiny.max_text_positions, pad_token_id=tiny.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        return BertModel(config)


def tiny_vision_tower(tiny: TinyClipSettings) -> ViTModel:
    config = ViTConfig(hidden_size=tiny.vision_hidden, num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads,
                       intermediate_size=4 * tiny.vision_hidden, image_size=tiny.image_size, patch_size=tiny.patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed + 1)
        return ViTModel(config)


def sentence_transformers_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers folder declares (``1_Pooling/config.json``), as one of ours."""
    file = Path(path) / "1_Pooling" / "config.json"
    if not path or not file.is_file():
        return None
    modes = json.loads(file.read_text())
    for key, ours in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                      ("pooling_mode_lasttoken", "last")):
        if modes.get(key):
            return ours
    raise ConfigError(f"{file}: its pooling mode is none of mean, cls or last-token; set model.towers.text_pooling")


def pool_first_token(hidden: Tensor, mask: Tensor) -> Tensor:
    """hidden [B, L, d] at each row's first real position (left padding puts padding first)."""
    first = mask.bool().int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def pool_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def pool(rule: str, out, mask: Tensor) -> Tensor:
    hidden = out.last_hidden_state
    if rule == "pooler":
        if getattr(out, "pooler_output", None) is None:
            raise ConfigError("pooling 'pooler': this model returns no pooler_output; choose cls, mean or last")
        return out.pooler_output
    return {"cls": pool_first_token, "mean": pool_mean, "last": pool_last_token}[rule](hidden, mask)


def _own_rule(probe) -> str:
    """A tower's own pooling: its ``pooler_output`` when it has a pooling head (BERT, CLIP, SigLIP), else the
    first token (the class token of encoders without a head, e.g. DINOv2, whose last states are normalised)."""
    return "pooler" if getattr(probe, "pooler_output", None) is not None else "cls"


def _width(tower: nn.Module) -> int:
    return tower.config.hidden_size


def _linear_or_identity(d_in: int, d_out: int) -> nn.Module:
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)


class TowersEncoder(nn.Module):
    """A text tower and a vision tower projected to the matcher's widths (module docstring). As ClipEncoder,
    the vision tower runs only on rows that have an image; the others get zeros and ``image_mask`` False."""

    def __init__(self, s: TowersSettings, tiny: TinyClipSettings, text_dim: int, image_dim: int) -> None:
        super().__init__()
        self.settings = s
        self.text = load_tower(s.text_path, "text_model") if s.text_path else tiny_text_tower(tiny)
        self.vision = load_tower(s.vision_path, "vision_model") if s.vision_path else tiny_vision_tower(tiny)
        self.text_global_proj = _linear_or_identity(_width(self.text), text_dim)
        self.text_token_proj = _linear_or_identity(_width(self.text), text_dim)
        self.image_global_proj = nn.Linear(_width(self.vision), image_dim)
        self.image_token_proj = nn.Linear(_width(self.vision), image_dim)
        self.image_dim = image_dim
        self.image_size = int(self.vision.config.image_size)
        # one probe of each tower: its token count and whether it has a pooling head (its dropout draws no numbers
        # from the seeded generator the matcher's initialisation uses next)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            text_probe = self.text(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2, dtype=torch.long))
            image_probe = self.vision(pixel_values=torch.zeros(1, 3, self.image_size, self.image_size))
        self.image_tokens = image_probe.last_hidden_state.shape[1]
        self.text_rule = s.text_pooling
        if self.text_rule == "auto":
            self.text_rule = sentence_transformers_pooling(s.text_path) or _own_rule(text_probe)
        self.vision_rule = _own_rule(image_probe) if s.vision_pooling == "auto" else s.vision_pooling

    @property
    def image_mean_std(self) -> tuple[list[float], list[float]] | None:
        """The vision folder's normalisation (``preprocessor_config.json``), or None: the collator's default (CLIP's)."""
        file = Path(self.settings.vision_path) / "preprocessor_config.json"
        if not self.settings.vision_path or not file.is_file():
            return None
        conf = json.loads(file.read_text())
        if "image_mean" not in conf or "image_std" not in conf:
            return None
        return list(conf["image_mean"]), list(conf["image_std"])

    @property
    def vocab_size(self) -> int:
        return int(self.text.config.vocab_size)

    @property
    def max_text_positions(self) -> int | None:
        return getattr(self.text.config, "max_position_embeddings", None)

    def enable_activation_checkpointing(self) -> None:
        """Recompute both towers' layer activations in backward instead of keeping them (non-reentrant)."""
        for tower in (self.text, self.vision):
            tower.activation_checkpointing_enable({"use_reentrant": False})

    def compile_towers(self) -> None:
        """torch.compile both towers in place (state-dict keys unchanged; train.compile)."""
        for tower in (self.text, self.vision):
            tower.compile()

    def text_states(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The text tower's last hidden states [B, L, h] and pooled vector [B, h], before the projections."""
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, pool(self.text_rule, out, attention_mask)

    def image_states(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """The vision tower's last hidden states [B, Lv, h] and pooled vector [B, h], before the projections."""
        out = self.vision(pixel_values=pixel_values)
        tokens = out.last_hidden_state
        return tokens, pool(self.vision_rule, out, tokens.new_ones(tokens.shape[:2]))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_mask: Tensor) -> Features:
        tokens, pooled = self.text_states(input_ids, attention_mask)
        text_global, text_tokens = self.text_global_proj(pooled), self.text_token_proj(tokens)
        batch, image_mask = input_ids.shape[0], image_mask.bool()
        dtype = text_tokens.dtype
        image_global = text_tokens.new_zeros(batch, self.image_dim)
        image_tokens = text_tokens.new_zeros(batch, self.image_tokens, self.image_dim)
        if image_mask.any():
            rows = image_mask.nonzero(as_tuple=True)[0]
            tok, g = self.image_states(pixel_values[image_mask].to(dtype))
            image_global = image_global.index_put((rows,), self.image_global_proj(g).to(dtype))
            image_tokens = image_tokens.index_put((rows,), self.image_token_proj(tok).to(dtype))
        return Features(text_global, text_tokens, attention_mask.bool(), image_global, image_tokens, image_mask)
