"""The MMoE matcher: input LayerNorms, text, vision and cross units, the entity cache, block scoring.

Flow: encoder ``Features`` -> :meth:`MMoEMatcher.mention_side` / :meth:`MMoEMatcher.entity_side`
(each unit's per-input work, done once per input) -> :meth:`MMoEMatcher.score` for a block of
mentions against a block of entities -> ``{"overall", "text", "vision", "cross"}`` score
matrices [M, N]. ``overall`` is the mean of the enabled units' scores.

``compat: published`` reproduces the published matcher with its defects (the published gate, no
padding masks, the cross gate read differently on the two sides, zero pixels for a missing
image); its scores depend on which other inputs share a side's batch, so evaluation then runs the
published blocking (``eval.compat_entity_block``, ``eval.compat_mention_batch``). It exists to
reproduce published numbers, never for new results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from core.typed_config import ConfigError, check_choices, ranged
from moe.features import Features, SideCache
from moe.layer_spec import check_gate_backend
from moe.units import CrossGate, CrossUnit, IntraUnit, MoELog, MoESettings

UNITS = ("text", "vision", "cross")
Compat = Literal["none", "published"]


@dataclass
class MatcherSettings:
    """Widths and switches of the matcher (published: dt 512, dv 96, hidden 96, cross 96)."""

    text_dim: int = ranged(512, 1)  # dt: CLIP text width (global and tokens)
    image_dim: int = ranged(96, 1)  # dv: image global and tokens after the encoder's linear maps
    hidden: int = ranged(96, 1)  # h: output width of the text and vision units' experts
    cross_dim: int = ranged(96, 1)  # c: the cross unit's width
    units: dict[str, bool] = field(default_factory=lambda: {u: True for u in UNITS})
    cross_gate: CrossGate = "context"  # what the cross unit's scalar gate reads, on both sides
    compat: Compat = "none"  # published: reproduce the published code, defects included
    moe: MoESettings = field(default_factory=MoESettings)

    def __post_init__(self) -> None:
        check_choices(self, "model.matcher.")
        check_gate_backend("published" if self.published else "switch", self.moe.backend)
        self.enabled()
        # A unit not listed is on: every unit spelled out, so an override of one (units.cross=false, which replaces
        # the whole mapping) changes only that key in the saved config and in a resume's comparison.
        self.units = {u: self.units.get(u, True) for u in UNITS}

    @property
    def published(self) -> bool:
        return self.compat == "published"

    def enabled(self) -> list[str]:
        unknown = set(self.units) - set(UNITS)
        if unknown:
            raise ConfigError(f"model.matcher.units: unknown unit(s) {sorted(unknown)}; units are {UNITS}")
        on = [u for u in UNITS if self.units.get(u, True)]
        if not on:
            raise ConfigError("model.matcher.units: at least one of the text, vision and cross units must be enabled")
        return on


class MMoEMatcher(nn.Module):
    def __init__(self, settings: MatcherSettings) -> None:
        super().__init__()
        self.settings = s = settings
        self.unit_names = s.enabled()
        gate = "published" if s.published else "switch"
        masked = not s.published
        # Input LayerNorms, shared by mentions and entities and by the units.
        self.text_global_norm = nn.LayerNorm(s.text_dim)
        self.text_token_norm = nn.LayerNorm(s.text_dim)
        self.image_global_norm = nn.LayerNorm(s.image_dim)
        self.image_token_norm = nn.LayerNorm(s.image_dim)
        self.units = nn.ModuleDict()
        if "text" in self.unit_names:
            self.units["text"] = IntraUnit("text", s.text_dim, s.hidden, s.moe, gate=gate, masked=masked)
        if "vision" in self.unit_names:
            self.units["vision"] = IntraUnit("vision", s.image_dim, s.hidden, s.moe, gate=gate, masked=masked)
        if "cross" in self.unit_names:
            self.units["cross"] = CrossUnit(s.text_dim, s.image_dim, s.cross_dim, s.moe, gate=gate,
                                            gate_source="published" if s.published else s.cross_gate, masked=masked)
        # Learned stand-ins for inputs without an image (see Features); the published code feeds
        # zero pixels through CLIP instead (the encoder does that under compat: published).
        self.no_image_global = nn.Parameter(torch.zeros(s.image_dim))
        self.no_image_token = nn.Parameter(torch.zeros(s.image_dim))
        nn.init.normal_(self.no_image_global, std=0.02)
        nn.init.normal_(self.no_image_token, std=0.02)

    def _image(self, f: Features) -> tuple[Tensor, Tensor]:
        if self.settings.published:  # the encoder already ran CLIP on zero pixels for missing images
            return f.image_global, f.image_tokens
        has = f.image_mask
        g = torch.where(has[:, None], f.image_global, self.no_image_global.to(f.image_global.dtype))
        tok = torch.where(has[:, None, None], f.image_tokens, self.no_image_token.to(f.image_tokens.dtype))
        return g, tok

    def _side(self, f: Features, mention: bool) -> tuple[SideCache, MoELog]:
        log = MoELog()
        img_g, img_tok = self._image(f)
        tc, tt = self.text_global_norm(f.text_global), self.text_token_norm(f.text_tokens)
        ic, it = self.image_global_norm(img_g), self.image_token_norm(img_tok)
        image_mask = torch.ones(it.shape[:2], dtype=torch.bool, device=it.device)
        out: dict[str, Tensor] = {}
        for name in self.unit_names:
            unit = self.units[name]
            if name == "cross":
                part = unit.side(tc, tt, f.text_mask, ic, it, log, mention=mention)
            else:
                args = (tc, tt, f.text_mask) if name == "text" else (ic, it, image_mask)
                part = unit.mention_side(*args, log) if mention else unit.entity_side(*args, log)
            out.update({f"{name}.{k}": v for k, v in part.items()})
        return SideCache(out), log

    def compile_sides(self) -> None:
        """torch.compile the side computation and the scoring (train.compile); the parameters stay this module's."""
        self._side = torch.compile(self._side)
        self._score = torch.compile(self._score)

    def mention_side(self, f: Features) -> tuple[SideCache, MoELog]:
        return self._side(f, mention=True)

    def entity_side(self, f: Features) -> tuple[SideCache, MoELog]:
        """Everything that depends only on the entity: compute once per entity and cache."""
        return self._side(f, mention=False)

    def score(self, mentions: SideCache, entities: SideCache) -> dict[str, Tensor]:
        """Scores [M, N] of a block of mentions against a block of entities, per unit and overall."""
        return self._score(mentions, entities, candidates=False)

    def score_candidates(self, mentions: SideCache, candidates: SideCache) -> dict[str, Tensor]:
        """Scores [M, K] of each mention against its own K candidates (re-ranking): ``candidates``
        holds M * K entity rows, mention-major (rows i*K .. i*K+K-1 are mention i's)."""
        if not len(mentions) or len(candidates) % len(mentions):
            raise ValueError(f"{len(candidates)} candidate rows are not K per mention for {len(mentions)} mentions")
        return self._score(mentions, candidates, candidates=True)

    def score_pairs(self, mentions: SideCache, entities: SideCache) -> dict[str, Tensor]:
        """Scores [P] of aligned pairs: mention row p against entity row p."""
        if len(mentions) != len(entities):
            raise ValueError(f"paired scoring needs as many mentions as entities, got {len(mentions)} and {len(entities)}")
        return {k: v[:, 0] for k, v in self.score_candidates(mentions, entities).items()}

    def _score(self, mentions: SideCache, entities: SideCache, candidates: bool) -> dict[str, Tensor]:
        scores: dict[str, Tensor] = {}
        for name in self.unit_names:
            m = {k.split(".", 1)[1]: v for k, v in mentions.tensors.items() if k.startswith(name + ".")}
            e = {k.split(".", 1)[1]: v for k, v in entities.tensors.items() if k.startswith(name + ".")}
            unit = self.units[name]
            scores[name] = unit.score_candidates(m, e) if candidates else unit.score(m, e)
        # (text + vision + cross) / 3, summed in that order as published
        scores["overall"] = sum(scores[n] for n in self.unit_names) / len(self.unit_names)
        return scores

    def separable_vectors(self, side: SideCache) -> Tensor:
        """The part of the score that is an inner product of per-input vectors.

        g2g of the text and vision units (the LayerNormed input globals) and the whole cross unit
        are separable; g2l is not. Returns [B, D] such that mention_vec . entity_vec equals the
        separable part of the overall score (with the weights the overall mean gives it).
        """
        n_units = len(self.unit_names)
        parts: list[Tensor] = []
        for name in self.unit_names:
            if name == "cross":
                # cross score = (t2i.t2i + i2t.i2t) / 2, weighted 1/n_units in the overall mean.
                w = (0.5 / n_units) ** 0.5
                parts += [side["cross.t2i"] * w, side["cross.i2t"] * w]
            else:
                # unit score = (g2l + g2g) / 2 -> g2g weight 1 / (2 n_units).
                parts.append(side[f"{name}.glob"] * (0.5 / n_units) ** 0.5)
        return torch.cat(parts, dim=-1)
