"""The DeepSpeed-MoE backend of the switch layers (``model.matcher.moe.backend: deepspeed``).

:class:`DeepSpeedSwitchMoE` is ``deepspeed.moe.layer.MoE`` with FFN experts ``d -> h -> d`` (GELU),
routed by :class:`SeparateInputGate` (DeepSpeed's ``TopKGate`` reading an optional separate gate
input), and it keeps :class:`moe.switch.SwitchMoE`'s interface: ``forward(x, gate_input=None) ->
MoEOutput``. With ``ep_size`` > 1 each rank holds ``num_experts / ep_size`` experts and tokens travel
to them by all-to-all over the expert-parallel group, which ``deepspeed.initialize`` creates (or
:func:`setup_expert_parallel` after ``deepspeed.init_distributed``).

Every forward pass of a layer with ``ep_size`` > 1 is a collective: all ranks of its group must
call it the same number of times. Training does; evaluation (ranks encode different numbers of
batches) must use local copies with every expert instead: ``moe.expert_parallel.local_experts`` or an
export. The weight layouts and their mapping are in :mod:`moe.expert_layout`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.comm import pg_utils
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating, topkgating
from torch import Tensor, nn

from moe.expert_layout import LOCAL_KEYS, local_to_deepspeed, take_prefixed
from moe.layer_spec import LayerSpec, check_ep_size, check_ep_world, check_gate_backend
from moe.switch import MoEOutput, SwitchMoE


class ExpertFFN(nn.Module):
    """One expert: gelu(x W1^T + b1) W2^T + b2 (``d_model -> d_ff -> d_out``), the math of
    ``SwitchMoE.expert_forward``.

    DeepSpeed's ``MOELayer`` moves tokens at one width and reshapes the combined output to the
    input's shape, so an expert whose output width differs from its input width cannot run in it
    as is. Here both travel at ``width = max(d_model, d_out)``: the expert reads the first
    ``d_model`` columns and writes its result into the first ``d_out`` columns, zeros after
    (:class:`DeepSpeedSwitchMoE` pads the input and slices the output).
    """

    def __init__(self, d_model: int, d_ff: int, d_out: int | None = None) -> None:
        super().__init__()
        self.d_model, self.d_out = d_model, d_out or d_model
        self.width = max(self.d_model, self.d_out)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, self.d_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc2(F.gelu(self.fc1(x[..., : self.d_model])))
        return F.pad(y, (0, self.width - self.d_out)) if self.d_out < self.width else y


class SeparateInputGate(TopKGate):
    """DeepSpeed's ``TopKGate`` that routes on the MoE layer's second positional argument when one is given.

    ``MOELayer`` hands that argument (``used_token`` in DeepSpeed's signature) to its gate; here it is
    the gate input ``[..., gate_dim]`` aligned with the routed tokens. The routing functions are
    DeepSpeed's own; the gate also keeps the router z-loss and which tokens lost every route.
    """

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec.gate_dim, spec.num_experts, spec.top_k, spec.capacity_factor, spec.eval_capacity_factor,
                         spec.min_capacity, noisy_gate_policy=None, drop_tokens=spec.drop_tokens, use_rts=False,
                         ep_group=None, top2_2nd_expert_sampling=False)
        self.wg = nn.Linear(spec.gate_dim, spec.num_experts).float()  # the published router has a bias
        self.z_loss: Tensor | None = None
        self.lost: Tensor | None = None  # [tokens] bool, every route dropped by the capacity limit

    def forward(self, input: Tensor, used_token: Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        source = input if used_token is None else used_token.reshape(-1, used_token.shape[-1])
        if source.shape[0] != input.shape[0]:
            raise ValueError(f"gate input has {source.shape[0]} tokens, the routed input {input.shape[0]}")
        logits = F.linear(source.float(), self.wg.weight.float(), self.wg.bias.float())
        self.z_loss = torch.logsumexp(logits, dim=1).pow(2).mean()
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            out = top1gating(logits, cf, self.min_capacity, None, None, self.drop_tokens, False, self.ep_group,
                             sparse_routes, use_tutel)
        elif self.k == 2:
            out = top2gating(logits, cf, self.min_capacity, self.drop_tokens, self.ep_group, False, sparse_routes)
        else:
            out = topkgating(logits, self.k, cf, self.min_capacity, self.drop_tokens, self.ep_group,
                             sparse_routes=sparse_routes)
        if sparse_routes:  # out[3]: [k, tokens] expert index per route, -1 where dropped
            self.lost = (out[3] < 0).all(dim=0).detach()
            if self.drop_tokens and pg_utils.is_parallel(self.ep_group):
                # Capacity follows the local token count; the all-to-all needs one buffer size per group.
                # Routes were kept under the local capacity, so a larger buffer only adds empty slots.
                capacity = torch.as_tensor(out[1]).clone()
                dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
                out = (out[0], capacity, *out[2:])
        return out


def _default_ep_rank(ep_size: int) -> int:
    """The expert-parallel rank DeepSpeed's default topology gives this process (consecutive groups)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    return rank % ep_size


class DeepSpeedSwitchMoE(MoE):
    """``deepspeed.moe.layer.MoE`` behind the ``SwitchMoE`` interface (see the module docstring): the
    layer ``spec`` describes (:class:`moe.layer_spec.LayerSpec`, switch gate only), its experts shared
    by ``ep_size`` ranks.

    Initialised from the same random draws as ``SwitchMoE`` (same seed, same weights: this rank
    keeps its slice of the experts), so switching the backend does not change a run's start.
    ``dropped: passthrough`` keeps the input of a token whose every route was dropped. An expert
    width change (``d_out`` != ``d_model``, the text unit's 512 -> 96) runs at the wider of the two
    widths (see :class:`ExpertFFN`): the all-to-all then carries zero columns.
    """

    backend = "deepspeed"

    def __init__(self, spec: LayerSpec, *, ep_size: int = 1) -> None:
        check_gate_backend(spec.gate, self.backend)
        check_ep_size(ep_size, spec.num_experts)
        with torch.random.fork_rng(devices=[]):  # DeepSpeed's own init draws are replaced below
            super().__init__(spec.width, ExpertFFN(spec.d_model, spec.d_ff, spec.d_out), num_experts=spec.num_experts,
                             ep_size=ep_size, k=spec.top_k, capacity_factor=spec.capacity_factor,
                             eval_capacity_factor=spec.eval_capacity_factor, min_capacity=spec.min_capacity,
                             noisy_gate_policy=None, drop_tokens=spec.drop_tokens, use_rts=False,
                             top2_2nd_expert_sampling=False)
            self.deepspeed_moe.gate = SeparateInputGate(spec)
        self.spec = spec
        # True: allow eval-mode calls with ep_size > 1 (the caller keeps every rank in lockstep).
        self.lockstep_eval = False
        # Same draws as SwitchMoE (router first, then w1, w2, b1, b2); keep this rank's experts.
        ref = SwitchMoE(spec)
        self.load_local_state({n: v.detach() for n, v in ref.state_dict().items()}, _default_ep_rank(ep_size))
        self.register_load_state_dict_pre_hook(_accept_local_layout)

    # -- expert parallelism ------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Join (creating if needed) the expert-parallel group; idempotent, unlike DeepSpeed's."""
        if self.deepspeed_moe.ep_group is not None:
            return
        if self.ep_size > 1:
            if not dist.is_initialized():
                raise RuntimeError("expert parallelism (moe.ep_size > 1) needs deepspeed.init_distributed() first")
            check_ep_world(self.ep_size, dist.get_world_size())
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    @property
    def ep_group(self):
        return self.deepspeed_moe.ep_group

    def ep_rank(self) -> int:
        """Rank in the expert-parallel group (before the group exists: the one DeepSpeed will give)."""
        if self.ep_size == 1:
            return 0
        if self.ep_group is None:
            return _default_ep_rank(self.ep_size)
        return dist.get_rank(group=self.ep_group)

    def local_expert_ids(self, ep_rank: int | None = None) -> range:
        r = self.ep_rank() if ep_rank is None else ep_rank
        return range(r * self.num_local_experts, (r + 1) * self.num_local_experts)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, gate_input: Tensor | None = None) -> MoEOutput:  # type: ignore[override]
        if gate_input is not None and gate_input.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"gate input {tuple(gate_input.shape)} must match tokens {tuple(x.shape)} but the last dim")
        if self.ep_size > 1 and not self.training and not self.lockstep_eval:
            raise RuntimeError(
                "an expert-parallel MoE layer (ep_size > 1) is a collective even in eval mode, and evaluation runs "
                "different batches on each rank: evaluate inside `with moe.expert_parallel.local_experts(model) as m:` (every "
                "rank gathers all experts) or from an export (model.export.save_export)")
        s = self.spec
        # The gate always gets its input explicitly: the routed tensor may be zero-padded.
        routed = F.pad(x, (0, s.width - s.d_model)) if s.d_model < s.width else x
        output, l_aux, counts = super().forward(routed, x if gate_input is None else gate_input)
        output = output[..., : s.d_out]
        gate = self.deepspeed_moe.gate
        lost = gate.lost
        if s.dropped == "passthrough" and s.drop_tokens:
            output = torch.where(lost.view(*x.shape[:-1], 1), x, output)
        return MoEOutput(output, l_aux, gate.z_loss, counts, lost.sum())

    # -- layouts (moe.expert_layout) ---------------------------------------------------------------
    def load_local_state(self, local: dict[str, Tensor], ep_rank: int | None = None) -> None:
        """Copy local-layout tensors (every expert) into this rank's gate and local experts."""
        own = self.state_dict()
        with torch.no_grad():
            for key, value in local_to_deepspeed(local, self.local_expert_ids(ep_rank)).items():
                own[key].copy_(value)

    def local_state(self) -> dict[str, Tensor]:
        """This rank's experts in the local layout, stacked (L = num_experts / ep_size of them)."""
        experts = self.deepspeed_moe.experts.deepspeed_experts
        return {
            "wg.weight": self.deepspeed_moe.gate.wg.weight.detach(),
            "wg.bias": self.deepspeed_moe.gate.wg.bias.detach(),
            "w1": torch.stack([e.fc1.weight.detach().t() for e in experts]),
            "b1": torch.stack([e.fc1.bias.detach() for e in experts]),
            "w2": torch.stack([e.fc2.weight.detach().t() for e in experts]),
            "b2": torch.stack([e.fc2.bias.detach() for e in experts]),
        }

    def gathered_local_state(self) -> dict[str, Tensor]:
        """Every expert in the local layout. Collective over the expert-parallel group when ep_size > 1."""
        mine = self.local_state()
        if self.ep_size == 1:
            return {k: v.clone() for k, v in mine.items()}
        group = self.ep_group
        if group is None:
            raise RuntimeError("this layer has no expert-parallel group yet: call deepspeed.initialize or "
                               "moe.deepspeed_backend.setup_expert_parallel(model) after deepspeed.init_distributed()")
        out = {"wg.weight": mine["wg.weight"].clone(), "wg.bias": mine["wg.bias"].clone()}
        for key in ("w1", "b1", "w2", "b2"):
            t = mine[key].contiguous()
            parts = [torch.empty_like(t) for _ in range(self.ep_size)]
            dist.all_gather(parts, t, group=group)
            out[key] = torch.cat(parts)  # group rank r holds global experts r*L .. r*L+L-1
        return out

    def to_local(self) -> SwitchMoE:
        """A ``SwitchMoE`` with every expert (collective when ep_size > 1), on this layer's device and dtype."""
        ref = self.deepspeed_moe.gate.wg.weight
        with torch.random.fork_rng(devices=[]):  # its init is overwritten; leave the RNG stream alone
            local = SwitchMoE(self.spec)
        local.load_state_dict(self.gathered_local_state())
        return local.to(ref.device, ref.dtype).train(self.training)


def _accept_local_layout(module: DeepSpeedSwitchMoE, state_dict: dict, prefix: str, *_) -> None:
    """Load a local-layout state (every expert, e.g. an export): keep the gate and this rank's experts."""
    if prefix + "w1" in state_dict:
        local = take_prefixed(state_dict, prefix, LOCAL_KEYS)
        for k, v in local_to_deepspeed(local, module.local_expert_ids()).items():
            state_dict[prefix + k] = v
