"""Switch mixture-of-experts layer with stacked expert weights (no Python loop over experts)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.expert_layout import deepspeed_to_local, ds_keys, take_prefixed
from moe.layer_spec import LayerSpec
from moe.routing import Routing, published_gate, switch_route


@dataclass
class MoEOutput:
    """Result of one MoE call: the transformed tokens plus what the trainer logs and optimises."""

    output: Tensor  # [..., d_out], the input's leading dimensions
    l_aux: Tensor  # load-balancing loss (0 for the published gate, which has none)
    z_loss: Tensor  # router z-loss
    expert_counts: Tensor  # [E] routes per expert before dropping
    dropped_tokens: Tensor  # tokens whose every route was dropped


def _accept_deepspeed_layout(module: SwitchMoE, state_dict: dict, prefix: str, *_) -> None:
    names = ds_keys(state_dict, prefix)
    if names:
        for k, v in deepspeed_to_local(take_prefixed(state_dict, prefix, names), module.num_experts).items():
            state_dict[prefix + k] = v


class SwitchMoE(nn.Module):
    """Top-k switch MoE over FFN experts ``d_model -> d_ff -> d_out`` (GELU; MMoE: d_ff = 4 d_model),
    as its :class:`moe.layer_spec.LayerSpec` describes.

    * ``gate="switch"`` (default): per-token routing with DeepSpeed ``TopKGate`` semantics
      (:func:`moe.routing.switch_route`); a token's output never depends on the other tokens
      unless ``drop_tokens`` is on.
    * ``gate="published"``: the published code's gate, defects included
      (:func:`moe.routing.published_gate`); inputs must be ``[batch, seq, d_model]``. Only for
      ``model.matcher.compat: published``.

    The router is ``Linear(gate_dim, E)`` with a bias, as published. The gate may read a different
    tensor than the experts transform (``gate_input``), which the cross unit uses. Tokens whose
    every route is dropped by the capacity limit get a zero output (``dropped="zero"``, as
    DeepSpeed) or keep their input (``dropped="passthrough"``, only when d_out == d_model).
    """

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        e, d_model, d_ff, d_out = spec.num_experts, spec.d_model, spec.d_ff, spec.d_out
        # Router with bias (the published w_gate), applied in fp32 like DeepSpeed's TopKGate.wg.
        self.wg = nn.Linear(spec.gate_dim, e)
        # Stacked expert FFNs: expert e computes gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e].
        self.w1 = nn.Parameter(torch.empty(e, d_model, d_ff))
        self.b1 = nn.Parameter(torch.zeros(e, d_ff))
        self.w2 = nn.Parameter(torch.empty(e, d_ff, d_out))
        self.b2 = nn.Parameter(torch.zeros(e, d_out))
        self.reset_parameters()
        # A DeepSpeed-layout state dict holding every expert loads too (moe.expert_layout).
        self.register_load_state_dict_pre_hook(_accept_deepspeed_layout)

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    def reset_parameters(self) -> None:
        # Same init as nn.Linear for each expert, so a per-expert nn.Linear copy matches in scale.
        for w, b, fan_in in ((self.w1, self.b1, self.spec.d_model), (self.w2, self.b2, self.spec.d_ff)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        """One expert on its own (used by tests and by weight conversion to per-expert modules)."""
        h = F.gelu(x @ self.w1[expert] + self.b1[expert])
        return h @ self.w2[expert] + self.b2[expert]

    def router_logits(self, gate_input: Tensor) -> Tensor:
        return F.linear(gate_input.float(), self.wg.weight.float(), self.wg.bias.float())

    def forward(self, x: Tensor, gate_input: Tensor | None = None) -> MoEOutput:
        gate_input = x if gate_input is None else gate_input
        if gate_input.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"gate input {tuple(gate_input.shape)} must match tokens {tuple(x.shape)} but the last dim")
        s = self.spec
        if s.gate == "published":
            return self._forward_published(x, gate_input)
        tokens = x.reshape(-1, s.d_model)
        routing = switch_route(
            self.router_logits(gate_input.reshape(-1, gate_input.shape[-1])),
            s.top_k,
            capacity_factor=s.capacity_factor if self.training else s.eval_capacity_factor,
            min_capacity=s.min_capacity,
            drop_tokens=s.drop_tokens,
        )
        out = self._dispatch(tokens, routing)
        dropped = routing.dropped_tokens
        if s.dropped == "passthrough" and s.drop_tokens:
            lost = ~routing.kept.any(dim=1)
            out = torch.where(lost.unsqueeze(1), tokens, out)
        return MoEOutput(out.view(*x.shape[:-1], s.d_out), routing.l_aux, routing.z_loss, routing.expert_counts, dropped)

    def _dispatch(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Sort kept routes by expert into an [E, C, d] buffer, run all experts with two batched
        matmuls, and add each route's weighted result back to its token."""
        num_tokens, num_experts, d_model, d_out = tokens.shape[0], self.spec.num_experts, self.spec.d_model, self.spec.d_out
        out = tokens.new_zeros(num_tokens, d_out)
        route_token = torch.arange(num_tokens, device=tokens.device).unsqueeze(1).expand_as(routing.expert_index)
        kept = routing.kept.reshape(-1)
        expert = routing.expert_index.reshape(-1)[kept]
        token = route_token.reshape(-1)[kept]
        weight = routing.weight.reshape(-1)[kept]
        if expert.numel() == 0:
            return out
        # Position of every route inside its expert's block (stable sort keeps token order).
        order = torch.sort(expert, stable=True).indices
        counts = torch.bincount(expert, minlength=num_experts)
        starts = counts.cumsum(0) - counts
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=order.device) - starts[expert[order]]
        cap = int(counts.max().item())
        slot = expert * cap + position
        buffer = tokens.new_zeros(num_experts * cap, d_model).index_copy(0, slot, tokens[token])
        buffer = buffer.view(num_experts, cap, d_model)
        hidden = F.gelu(torch.baddbmm(self.b1.unsqueeze(1).to(tokens.dtype), buffer, self.w1.to(tokens.dtype)))
        result = torch.baddbmm(self.b2.unsqueeze(1).to(tokens.dtype), hidden, self.w2.to(tokens.dtype))
        routed = result.reshape(-1, d_out)[slot] * weight.unsqueeze(1).to(tokens.dtype)
        return out.index_add(0, token, routed)

    def _forward_published(self, x: Tensor, gate_input: Tensor) -> MoEOutput:
        """Every expert on every token, weighted by the published gate. Written with the published
        code's operations in its order (``nn.Linear``-layout weights, stacking the experts on the
        last dimension, one sum over it), so its numbers are reproduced to the bit on a given
        machine, not merely to rounding. Slow by design (dense); only for ``compat: published``."""
        if x.dim() != 3:
            raise ValueError("the published gate needs [batch, seq, d_model] inputs")
        weights = published_gate(self.router_logits(gate_input), self.spec.top_k).to(x.dtype)  # [N, L, E]
        outs = []
        for e in range(self.num_experts):
            hidden = F.gelu(F.linear(x, self.w1[e].t().contiguous(), self.b1[e]))
            outs.append(F.linear(hidden, self.w2[e].t().contiguous(), self.b2[e]))
        out = torch.sum(weights.unsqueeze(-2) * torch.stack(outs, dim=-1), dim=-1)
        zero = x.new_zeros((), dtype=torch.float32)
        counts = (weights > 0).reshape(-1, self.num_experts).sum(0)
        dropped = (weights.sum(-1) == 0).sum()
        return MoEOutput(out, zero, zero, counts, dropped)
