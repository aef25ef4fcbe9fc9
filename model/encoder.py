"""CLIP feature extraction for mentions and entities (Hugging Face ``CLIPModel``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel

from core.typed_config import ranged
from moe.features import Features


@dataclass
class TinyClipSettings:
    """A small random-init CLIP for tests and the synthetic demo (no weights can be downloaded here)."""

    # 0 / -1: taken from the tokenizer when the model is built (model.mmoe.build_model)
    vocab_size: int = ranged(0, 0)
    bos_token_id: int = ranged(-1, -1)
    eos_token_id: int = ranged(-1, -1)  # HF's CLIP pools at the first eos; ClipEncoder pools at the last real token instead
    pad_token_id: int = ranged(-1, -1)
    text_hidden: int = ranged(64, 1)
    vision_hidden: int = ranged(64, 1)
    layers: int = ranged(2, 1)
    heads: int = ranged(4, 1)
    image_size: int = ranged(64, 1)
    patch_size: int = ranged(16, 1)  # <= image_size (model.config.check_ranges)
    projection_dim: int = ranged(64, 1)
    max_text_positions: int = ranged(64, 1)
    seed: int = ranged(0, 0)

    def clip_config(self) -> CLIPConfig:
        if self.vocab_size <= 0 or min(self.bos_token_id, self.eos_token_id, self.pad_token_id) < 0:
            raise ValueError("tiny_clip needs vocab_size and bos/eos/pad token ids (build_model takes them from the tokenizer)")
        text = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.text_hidden,
            intermediate_size=4 * self.text_hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.max_text_positions,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        vision = dict(
            hidden_size=self.vision_hidden,
            intermediate_size=4 * self.vision_hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.projection_dim)


def load_clip(path: str, tiny: TinyClipSettings) -> CLIPModel:
    """Load CLIP from a local folder or hub id; with an empty path build the tiny seeded model."""
    if path:
        try:
            return CLIPModel.from_pretrained(path)
        except OSError as err:
            raise OSError(
                f"could not load CLIP from {path!r}: give a local folder holding config.json and the "
                "weights (for example a saved openai/clip-vit-base-patch32), or leave model.clip_path "
                "empty to build the small random-init CLIP from model.tiny_clip"
            ) from err
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        return CLIPModel(tiny.clip_config())


def pool_last_token(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """hidden [B, L, d] at each row's last non-padding position (the mask's last 1) -> [B, d].

    Hugging Face's CLIP text model pools at the *first* eos id (or at the highest id when eos_token_id
    is 2). With a tokenizer whose eos is also the mention/sentence separator (BERT's ``[SEP]``), that
    is the token right after the mention, and the causal text tower has not seen the sentence there.
    CLIP's own tokenizer ends every text with its eos, so pooling at the last real token gives the
    same vector for it, and cannot collide with a separator for any tokenizer."""
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def image_token_count(clip: CLIPModel) -> int:
    v = clip.config.vision_config
    return (v.image_size // v.patch_size) ** 2 + 1


class ClipEncoder(nn.Module):
    """Runs CLIP and projects to the matcher's widths.

    text_global   = text_projection(pooled)                [B, dt] (Linear if projection_dim != dt);
                    pooled at the last non-padding token (pool_last_token)
    text_tokens   = last hidden states of the text model    [B, Lt, dt] (Linear if hidden != dt)
    image_global  = Linear(visual_projection(pooled), dv)   [B, dv]
    image_tokens  = Linear(vision last hidden states, dv)   [B, Lv, dv]
    The vision tower runs only on inputs that have an image; the others get zeros and
    ``image_mask`` False. With ``zero_pixels_for_missing`` (``compat: published``) it runs on every
    row, an input without an image reading all-zero (normalised) pixels, as the published code does.
    """

    def __init__(self, clip: CLIPModel, text_dim: int, image_dim: int, zero_pixels_for_missing: bool = False) -> None:
        super().__init__()
        self.clip = clip
        self.zero_pixels_for_missing = zero_pixels_for_missing
        # CLIP's own contrastive temperature is not used by the matcher. As a 0-dim parameter it
        # would also trip DeepSpeed's parameter broadcast (a scalar cannot be viewed as bytes),
        # so it is kept as a buffer: out of the optimizer, still in the state dict.
        scale = clip.logit_scale.detach().clone()
        del clip.logit_scale
        clip.register_buffer("logit_scale", scale)
        proj = clip.config.projection_dim
        t_hidden = clip.config.text_config.hidden_size
        v_hidden = clip.config.vision_config.hidden_size
        self.text_global_proj = nn.Identity() if proj == text_dim else nn.Linear(proj, text_dim)
        self.text_token_proj = nn.Identity() if t_hidden == text_dim else nn.Linear(t_hidden, text_dim)
        self.image_global_proj = nn.Linear(proj, image_dim)
        self.image_token_proj = nn.Linear(v_hidden, image_dim)
        self.image_dim = image_dim
        self.image_tokens = image_token_count(clip)

    @property
    def vocab_size(self) -> int:
        return int(self.clip.config.text_config.vocab_size)

    @property
    def max_text_positions(self) -> int:
        return int(self.clip.config.text_config.max_position_embeddings)

    @property
    def image_size(self) -> int:
        return int(self.clip.config.vision_config.image_size)

    image_mean_std = None  # the collator's default normalisation is CLIP's

    def enable_activation_checkpointing(self) -> None:
        """Recompute the CLIP layers' activations in backward instead of keeping them (non-reentrant)."""
        self.clip.activation_checkpointing_enable({"use_reentrant": False})

    def compile_towers(self) -> None:
        """torch.compile both CLIP towers in place (state-dict keys unchanged; train.compile)."""
        self.clip.text_model.compile()
        self.clip.vision_model.compile()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_mask: Tensor) -> Features:
        text = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        # last_hidden_state is already after CLIP's final LayerNorm (as the pooler's input is), so this
        # equals pooler_output whenever the eos is the last real token (tests/unit/test_tokenizers.py)
        pooled = pool_last_token(text.last_hidden_state, attention_mask)
        text_global = self.text_global_proj(self.clip.text_projection(pooled))
        text_tokens = self.text_token_proj(text.last_hidden_state)
        batch = input_ids.shape[0]
        image_mask = image_mask.bool()
        run = torch.ones_like(image_mask) if self.zero_pixels_for_missing else image_mask
        dtype = text_tokens.dtype
        image_global = text_tokens.new_zeros(batch, self.image_dim)
        image_tokens = text_tokens.new_zeros(batch, self.image_tokens, self.image_dim)
        if run.any():
            pixels = torch.where(image_mask[:, None, None, None], pixel_values, 0.0)[run].to(dtype)
            vis = self.clip.vision_model(pixel_values=pixels)
            g = self.image_global_proj(self.clip.visual_projection(vis.pooler_output))
            tok = self.image_token_proj(vis.last_hidden_state)
            image_global = image_global.index_put((run.nonzero(as_tuple=True)[0],), g.to(dtype))
            image_tokens = image_tokens.index_put((run.nonzero(as_tuple=True)[0],), tok.to(dtype))
        return Features(text_global, text_tokens, attention_mask.bool(), image_global, image_tokens, image_mask)
