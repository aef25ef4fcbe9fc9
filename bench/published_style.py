"""A straightforward implementation of the published matcher's structure, as a benchmark baseline.

It computes the same scores as :class:`moe.matcher.MMoEMatcher` (same weights, default gate) but
the way the published design does: every (mention, entity) pair is expanded into its own row,
so the entity-side MoE and projections are recomputed for every mention, and the experts run in
a Python loop, each over every token, weighted by the (dense) gate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.features import Features
from moe.matcher import MMoEMatcher
from moe.routing import switch_route
from moe.switch import SwitchMoE
from moe.units import CrossUnit, IntraUnit, align_length


def loop_moe(moe: SwitchMoE, x: Tensor, gate_input: Tensor | None = None) -> Tensor:
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    g = (x if gate_input is None else gate_input).reshape(tokens.shape[0], -1)
    r = switch_route(moe.router_logits(g), moe.k, min_capacity=moe.min_capacity)
    weights = torch.zeros(tokens.shape[0], moe.num_experts).scatter_add(1, r.expert_index, r.weight)
    out = torch.zeros_like(tokens)
    for e in range(moe.num_experts):  # the published loop over experts
        out = out + weights[:, e : e + 1] * moe.expert_forward(e, tokens)
    return out.view(shape)


def _pairs(m: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """Expand [M, ...] and [N, ...] into [M*N, ...] rows, one per pair."""
    mm, nn_ = m.shape[0], e.shape[0]
    return m.repeat_interleave(nn_, dim=0), e.repeat(mm, *([1] * (e.dim() - 1)))


def _intra_pairs(unit: IntraUnit, mg, mt, mmask, eg, et, emask) -> Tensor:
    def route(g, t):
        out = loop_moe(unit.moe, unit.in_proj(torch.cat([g.unsqueeze(1), t], 1)))
        return out[:, 0], out[:, 1:]

    m_g, m_t = route(mg, mt)
    e_g, e_t = route(eg, et)
    q, k, v = unit.wq(e_t), unit.wk(m_t), unit.wv(m_t)
    logits = torch.einsum("pqh,pkh->pqk", q, k) / q.shape[-1] ** 0.5
    attn = torch.softmax(logits.masked_fill(~mmask[:, None, :], torch.finfo(logits.dtype).min), -1)
    ctx = torch.einsum("pqk,pkh->pqh", attn, v)
    w = emask.float() / emask.float().sum(1, keepdim=True).clamp_min(1)
    pooled = unit.norm((ctx * w.unsqueeze(-1)).sum(1))
    return ((pooled * e_g).sum(-1) + (m_g * e_g).sum(-1)) / 2


def _cross_side(unit: CrossUnit, tg, tt, tmask, ig, it) -> tuple[Tensor, Tensor]:
    tg, tt, ig, it = unit.text_proj(tg), unit.text_proj(tt), unit.image_proj(ig), unit.image_proj(it)
    gate_a = torch.cat([ig.unsqueeze(1), align_length(tt, it.shape[1])], 1)
    gate_b = torch.cat([tg.unsqueeze(1), align_length(it, tt.shape[1])], 1)
    a = loop_moe(unit.moe_t2i, torch.cat([tg.unsqueeze(1), it], 1), gate_a)
    b = loop_moe(unit.moe_i2t, torch.cat([ig.unsqueeze(1), tt], 1), gate_b)
    ones = torch.ones(it.shape[:2], dtype=torch.bool)
    return unit.pool_t2i(a[:, 0], a[:, 1:], ones), unit.pool_i2t(b[:, 0], b[:, 1:], tmask)


def published_style_scores(matcher: MMoEMatcher, mentions: Features, entities: Features) -> Tensor:
    """Overall scores [M, N], computed pair by pair."""
    mm, nn_ = len(mentions), len(entities)
    m_img = matcher._image(mentions)
    e_img = matcher._image(entities)
    ones = lambda t: torch.ones(t.shape[:2], dtype=torch.bool)  # noqa: E731
    per_unit = []
    for name in matcher.unit_names:
        unit = matcher.units[name]
        if name == "text":
            args = [*_pairs(mentions.text_global, entities.text_global), *_pairs(mentions.text_tokens, entities.text_tokens),
                    *_pairs(mentions.text_mask, entities.text_mask)]
            mg, eg, mt, et, mk, ek = args
            per_unit.append(_intra_pairs(unit, mg, mt, mk, eg, et, ek))
        elif name == "vision":
            mg, eg = _pairs(m_img[0], e_img[0])
            mt, et = _pairs(m_img[1], e_img[1])
            per_unit.append(_intra_pairs(unit, mg, mt, ones(mt), eg, et, ones(et)))
        else:
            mtg, etg = _pairs(mentions.text_global, entities.text_global)
            mtt, ett = _pairs(mentions.text_tokens, entities.text_tokens)
            mtm, etm = _pairs(mentions.text_mask, entities.text_mask)
            mig, eig = _pairs(m_img[0], e_img[0])
            mit, eit = _pairs(m_img[1], e_img[1])
            m_t2i, m_i2t = _cross_side(unit, mtg, mtt, mtm, mig, mit)
            e_t2i, e_i2t = _cross_side(unit, etg, ett, etm, eig, eit)
            per_unit.append(((m_t2i * e_t2i).sum(-1) + (m_i2t * e_i2t).sum(-1)) / 2)
    return torch.stack(per_unit).mean(0).view(mm, nn_)
