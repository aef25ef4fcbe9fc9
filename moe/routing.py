"""Token routing for the switch mixture of experts.

Two gates live here:

* :func:`switch_route` -- the default. Each token is routed on its own: softmax over the
  experts, keep the top-k, and (for k >= 2) renormalise over the kept experts. Capacity,
  token dropping and the load-balancing loss follow DeepSpeed's ``TopKGate`` exactly
  (``deepspeed/moe/sharded_moe.py``: ``top1gating``/``top2gating``/``topkgating`` with
  ``use_rts=False``, ``top2_2nd_expert_sampling=False`` and ``drop_policy="probs"``), so the
  DeepSpeed backend can be swapped in and give the same numbers.
* :func:`published_gate` -- the published MMoE gate, defects included (see its docstring), used only
  by ``model.matcher.compat: published`` to reproduce published numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moe.layer_spec import check_top_k


@dataclass
class Routing:
    """Where each token goes. ``T`` tokens, ``k`` routes per token, ``E`` experts."""

    expert_index: Tensor  # [T, k] long, the chosen experts (best first)
    weight: Tensor  # [T, k] float32 combine weight; 0 where the route was dropped
    kept: Tensor  # [T, k] bool, False where the capacity limit dropped the route
    capacity: int  # slots per expert used for this call
    l_aux: Tensor  # scalar load-balancing loss (DeepSpeed's formula for this k)
    z_loss: Tensor  # scalar router z-loss, mean(logsumexp(logits)^2) (ST-MoE)
    expert_counts: Tensor  # [E] routes per expert before dropping (DeepSpeed's exp_counts)

    @property
    def dropped_tokens(self) -> Tensor:
        """Number of tokens all of whose routes were dropped."""
        return (~self.kept.any(dim=1)).sum()


def capacity_for(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's ``_capacity`` with its per-k scaling: ceil(T / E * cf * k), at least min_capacity."""
    return max(math.ceil(num_tokens / num_experts * capacity_factor * k), min_capacity)


def switch_route(
    logits: Tensor,
    k: int,
    *,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = False,
) -> Routing:
    """Route ``T`` tokens given router logits ``[T, E]`` (computed in fp32 by the caller).

    Without ``drop_tokens`` every route is kept, so a token's output never depends on the other
    tokens of the call. With it, each expert takes at most ``capacity_for(...)`` routes:
    k <= 2 keeps the earliest tokens, first choices before second choices; k > 2 keeps the
    routes with the highest router probability ("probs" policy). Combine weights: for k = 1 the
    router probability itself (Switch Transformer; a weight of 1 would give the router no
    gradient), for k >= 2 the kept probabilities renormalised to sum to one.
    """
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    check_top_k(k, num_experts)
    logits = logits.float()
    probs = F.softmax(logits, dim=1)
    top_p, top_i = probs.topk(k, dim=1)  # [T, k]

    route_mask = F.one_hot(top_i, num_experts)  # [T, k, E]
    choice_mask = route_mask.sum(dim=1)  # [T, E], 0/1
    expert_counts = choice_mask.sum(dim=0).detach()

    # Load-balancing loss, exactly as DeepSpeed writes it for each k.
    me = probs.mean(dim=0)
    if k <= 2:
        ce = route_mask[:, 0].float().mean(dim=0)  # first choices only
        l_aux = (me * ce).sum() * num_experts
    else:
        ce = choice_mask.float().mean(dim=0)
        l_aux = (me * ce).mean() * num_experts * num_experts / k
    z_loss = torch.logsumexp(logits, dim=1).pow(2).mean()

    kept = torch.ones_like(top_i, dtype=torch.bool)
    if drop_tokens:
        capacity = capacity_for(num_tokens, num_experts, k, capacity_factor, min_capacity)
        if k <= 2:
            # Slot-major order: all first choices are placed before any second choice.
            per_slot = route_mask.transpose(0, 1)  # [k, T, E]
            position = per_slot.reshape(k * num_tokens, num_experts).cumsum(dim=0) - 1
            position = (position.view(k, num_tokens, num_experts) * per_slot).sum(-1)  # [k, T]
            kept = (position < capacity).t()
        else:
            dense_p = torch.zeros_like(probs).scatter(1, top_i, top_p)
            keep_n = min(capacity, num_tokens)
            best = dense_p.topk(keep_n, dim=0).indices  # [keep_n, E]
            allowed = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, best, True)
            kept = allowed.gather(1, top_i) & (top_p > 0)
    else:
        capacity = int(expert_counts.max().item()) if num_tokens else 0

    kept_p = top_p * kept
    if k == 1:
        weight = kept_p
    else:
        weight = kept_p / kept_p.sum(dim=1, keepdim=True).clamp_min(torch.finfo(kept_p.dtype).eps)
    return Routing(top_i, weight, kept, capacity, l_aux, z_loss, expert_counts)


def published_gate(logits: Tensor, k: int, capacity_factor: float = 1.0, eps: float = 1e-6) -> Tensor:
    """The published MMoE gate, reproduced with its defects. Returns dense weights [N, L, E].

    ``logits`` is ``[N, L, E]`` (batch, sequence, experts). What it does, step by step:

    1. ``p = softmax(logits, -1)`` and the top-k expert indices ``idx`` ([N, L, k]);
    2. the mask is built with ``scatter_(1, idx, 1)`` -- along the *sequence* dimension -- so it
       marks sequence positions ``idx`` (< E) in expert columns 0..k-1 instead of each token's
       chosen experts: ``mask[n, idx[n, l, j], j] = 1``. Tokens at positions >= E get an all-zero
       mask (zero MoE output) and only experts 0..k-1 ever receive weight;
    3. ``g = p * mask`` is divided by its sum over the *batch* dimension plus ``eps`` and
       multiplied by ``int(capacity_factor * N)``, so a token's weight depends on the other rows
       of the batch (the published "capacity").
    """
    if logits.dim() != 3:
        raise ValueError(f"the published gate needs [batch, seq, experts] logits, got {tuple(logits.shape)}")
    if logits.shape[1] < logits.shape[2]:
        raise ValueError("the published gate scatters expert ids along the sequence; needs seq_len >= num_experts")
    probs = F.softmax(logits, dim=-1)
    idx = probs.topk(k, dim=-1).indices  # [N, L, k]
    mask = torch.zeros_like(probs).scatter_(1, idx, 1.0)  # the published dim-1 scatter
    gated = probs * mask
    return gated / (gated.sum(dim=0, keepdim=True) + eps) * int(capacity_factor * logits.shape[0])
