"""A straightforward implementation of the faithful matcher, computed the way the published code
computes it: the benchmark baseline.

Same weights and same scores as :class:`moe.matcher.MMoEMatcher` (default model: per-token switch
gate, padding masked), but written as the published code is: every expert runs densely on every
token in a Python loop and the outputs are weighted by the gate (zero for unchosen experts), the
g2l attention is materialised as an [N, M, Lq, Lk] map whose value product [N, M, Lq, h] comes
before the mean over entity tokens, and nothing is cached between calls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe.features import Features
from moe.matcher import MMoEMatcher
from moe.routing import switch_route
from moe.switch import SwitchMoE
from moe.units import CrossUnit, IntraUnit, align_length


def dense_moe(moe: SwitchMoE, x: Tensor, gate_input: Tensor | None = None) -> Tensor:
    """Every expert on every token, weighted by the switch gate's (sparse) weights."""
    tokens = x.reshape(-1, x.shape[-1])
    g = (x if gate_input is None else gate_input).reshape(tokens.shape[0], -1)
    r = switch_route(moe.router_logits(g), moe.spec.top_k, min_capacity=moe.spec.min_capacity)
    weights = tokens.new_zeros(tokens.shape[0], moe.num_experts).scatter_add(1, r.expert_index, r.weight)
    out = 0
    for e in range(moe.num_experts):  # the published loop over experts
        out = out + weights[:, e : e + 1] * moe.expert_forward(e, tokens)
    return out.view(*x.shape[:-1], moe.spec.d_out)


def _intra(unit: IntraUnit, mg: Tensor, mt: Tensor, mmask: Tensor, eg: Tensor, et: Tensor, emask: Tensor) -> Tensor:
    m_out = dense_moe(unit.moe, torch.cat([mg.unsqueeze(1), mt], 1))
    e_out = dense_moe(unit.moe, torch.cat([eg.unsqueeze(1), et], 1))
    q = unit.wq(e_out[:, 1:]).unsqueeze(1)  # [N, 1, Lq, h]
    k, v = unit.wk(m_out[:, 1:]).unsqueeze(0), unit.wv(m_out[:, 1:]).unsqueeze(0)  # [1, M, Lk, h]
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [N, M, Lq, Lk]
    logits = logits.masked_fill(~mmask[None, :, None, :], torch.finfo(logits.dtype).min)
    ctx = torch.matmul(torch.softmax(logits, -1), v)  # [N, M, Lq, h]
    w = emask.float() / emask.float().sum(1, keepdim=True).clamp_min(1)  # mean over real entity tokens
    pooled = unit.norm((ctx * w[:, None, :, None]).sum(2))  # [N, M, h]
    g2l = (pooled * e_out[:, 0].unsqueeze(1)).sum(-1).t()
    return (g2l + mg @ eg.t()) / 2


def _cross_side(unit: CrossUnit, tg: Tensor, tt: Tensor, tmask: Tensor, ig: Tensor, it: Tensor) -> list[Tensor]:
    tg, tt, ig, it = unit.text_fc(tg), unit.text_fc(tt), unit.image_fc(ig), unit.image_fc(it)
    a = dense_moe(unit.moe, torch.cat([tg.unsqueeze(1), it], 1), torch.cat([ig.unsqueeze(1), align_length(tt, it.shape[1])], 1))
    b = dense_moe(unit.moe, torch.cat([ig.unsqueeze(1), tt], 1), torch.cat([tg.unsqueeze(1), align_length(it, tt.shape[1])], 1))
    out = []
    for routed, orig, mask in ((a, tg, None), (b, ig, tmask)):
        logits = torch.einsum("bh,blh->bl", routed[:, 0], routed[:, 1:])
        if mask is not None:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        ctx = torch.einsum("bl,blh->bh", torch.softmax(logits, -1), routed[:, 1:])
        src = orig if unit.gate_source == "global" else ctx
        out.append(unit.gate_norm(orig * torch.tanh(unit.gate_fc(src)) + ctx))
    return out


def published_style_scores(matcher: MMoEMatcher, mentions: Features, entities: Features) -> Tensor:
    """Overall scores [M, N] of the default model, computed the published way."""
    return published_style_unit_scores(matcher, mentions, entities)["overall"]


def published_style_unit_scores(matcher: MMoEMatcher, mentions: Features, entities: Features) -> dict[str, Tensor]:
    """Each unit's scores [M, N] and their mean (``overall``), computed the published way."""
    sides = []
    for f in (mentions, entities):
        img_g, img_t = matcher._image(f)
        sides.append((matcher.text_global_norm(f.text_global), matcher.text_token_norm(f.text_tokens), f.text_mask,
                      matcher.image_global_norm(img_g), matcher.image_token_norm(img_t)))
    (mtg, mtt, mmask, mig, mit), (etg, ett, emask, eig, eit) = sides
    per_unit = {}
    for name in matcher.unit_names:
        unit = matcher.units[name]
        if name == "text":
            per_unit[name] = _intra(unit, mtg, mtt, mmask, etg, ett, emask)
        elif name == "vision":
            ones_m = torch.ones(mit.shape[:2], dtype=torch.bool, device=mit.device)
            ones_e = torch.ones(eit.shape[:2], dtype=torch.bool, device=eit.device)
            per_unit[name] = _intra(unit, mig, mit, ones_m, eig, eit, ones_e)
        else:
            m_t2i, m_i2t = _cross_side(unit, mtg, mtt, mmask, mig, mit)
            e_t2i, e_i2t = _cross_side(unit, etg, ett, emask, eig, eit)
            per_unit[name] = (m_t2i @ e_t2i.t() + m_i2t @ e_i2t.t()) / 2
    return {"overall": sum(per_unit.values()) / len(per_unit), **per_unit}
