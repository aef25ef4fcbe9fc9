"""The MMoE matcher: text, vision and cross units, the entity cache, and block scoring.

Flow: encoder ``Features`` -> :meth:`MMoEMatcher.mention_side` / :meth:`MMoEMatcher.entity_side`
(each unit's per-input work, done once per input) -> :meth:`MMoEMatcher.score` for a block of
mentions against a block of entities -> ``{"overall", "text", "vision", "cross"}`` score
matrices [M, N]. ``overall`` is the mean of the enabled units' scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe.features import Features, SideCache
from moe.units import CrossUnit, IntraUnit, MoELog, MoESettings

UNITS = ("text", "vision", "cross")


@dataclass
class MatcherSettings:
    """Widths and switches of the matcher (paper: dt 512, dv 96, hidden 96)."""

    text_dim: int = 512
    image_dim: int = 96
    hidden: int = 96
    cross_dim: int = 96
    units: dict[str, bool] = field(default_factory=lambda: {u: True for u in UNITS})
    moe: MoESettings = field(default_factory=MoESettings)

    def enabled(self) -> list[str]:
        unknown = set(self.units) - set(UNITS)
        if unknown:
            raise ValueError(f"unknown unit(s) {sorted(unknown)}; units are {UNITS}")
        on = [u for u in UNITS if self.units.get(u, True)]
        if not on:
            raise ValueError("at least one of the text, vision and cross units must be enabled")
        return on


class MMoEMatcher(nn.Module):
    def __init__(self, settings: MatcherSettings) -> None:
        super().__init__()
        self.settings = settings
        self.unit_names = settings.enabled()
        s = settings
        self.units = nn.ModuleDict()
        if "text" in self.unit_names:
            self.units["text"] = IntraUnit("text", s.text_dim, s.hidden, s.moe)
        if "vision" in self.unit_names:
            self.units["vision"] = IntraUnit("vision", s.image_dim, s.hidden, s.moe)
        if "cross" in self.unit_names:
            self.units["cross"] = CrossUnit(s.text_dim, s.image_dim, s.cross_dim, s.moe)
        # Learned stand-ins for inputs without an image (see Features).
        self.no_image_global = nn.Parameter(torch.zeros(s.image_dim))
        self.no_image_token = nn.Parameter(torch.zeros(s.image_dim))
        nn.init.normal_(self.no_image_global, std=0.02)
        nn.init.normal_(self.no_image_token, std=0.02)

    def _image(self, f: Features) -> tuple[Tensor, Tensor]:
        has = f.image_mask
        g = torch.where(has[:, None], f.image_global, self.no_image_global.to(f.image_global.dtype))
        tok = torch.where(has[:, None, None], f.image_tokens, self.no_image_token.to(f.image_tokens.dtype))
        return g, tok

    def _side(self, f: Features, mention: bool) -> tuple[SideCache, MoELog]:
        log = MoELog()
        img_g, img_tok = self._image(f)
        out: dict[str, Tensor] = {}
        for name in self.unit_names:
            unit = self.units[name]
            if name == "cross":
                part = unit.side(f.text_global, f.text_tokens, f.text_mask, img_g, img_tok, log)
            else:
                if name == "text":
                    args = (f.text_global, f.text_tokens, f.text_mask)
                else:
                    args = (img_g, img_tok, torch.ones(img_tok.shape[:2], dtype=torch.bool, device=img_tok.device))
                part = unit.mention_side(*args, log) if mention else unit.entity_side(*args, log)
            out.update({f"{name}.{k}": v for k, v in part.items()})
        return SideCache(out), log

    def mention_side(self, f: Features) -> tuple[SideCache, MoELog]:
        return self._side(f, mention=True)

    def entity_side(self, f: Features) -> tuple[SideCache, MoELog]:
        """Everything that depends only on the entity: compute once per entity and cache."""
        return self._side(f, mention=False)

    def score(self, mentions: SideCache, entities: SideCache) -> dict[str, Tensor]:
        """Scores [M, N] of a block of mentions against a block of entities, per unit and overall."""
        return self._score(mentions, entities, paired=False)

    def score_pairs(self, mentions: SideCache, entities: SideCache) -> dict[str, Tensor]:
        """Scores [P] of aligned pairs: mention row p against entity row p (candidate re-ranking)."""
        if len(mentions) != len(entities):
            raise ValueError(f"paired scoring needs as many mentions as entities, got {len(mentions)} and {len(entities)}")
        return self._score(mentions, entities, paired=True)

    def _score(self, mentions: SideCache, entities: SideCache, paired: bool) -> dict[str, Tensor]:
        scores: dict[str, Tensor] = {}
        for name in self.unit_names:
            m = {k.split(".", 1)[1]: v for k, v in mentions.tensors.items() if k.startswith(name + ".")}
            e = {k.split(".", 1)[1]: v for k, v in entities.tensors.items() if k.startswith(name + ".")}
            unit = self.units[name]
            scores[name] = unit.score_pairs(m, e) if paired else unit.score(m, e)
        scores["overall"] = torch.stack([scores[n] for n in self.unit_names]).mean(0)
        return scores

    def separable_vectors(self, side: SideCache) -> Tensor | None:
        """The part of the score that is an inner product of per-input vectors.

        g2g of the text and vision units and the whole cross unit are separable; g2l is not.
        Returns [B, D] such that mention_vec . entity_vec equals the separable part of the
        overall score (the same linear weights the overall mean gives them), or None if no
        enabled unit has a separable part.
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
                parts.append(side[f"{name}.g"] * (0.5 / n_units) ** 0.5)
        return torch.cat(parts, dim=-1) if parts else None
