"""The two layouts of a switch layer's weights and the mapping between them (pure torch, no DeepSpeed).

Local layout (``moe.switch.SwitchMoE``, every export, ``model.safetensors``), E experts, input width
d, hidden h, output width o, gate width g::

    wg.weight  [E, g]     wg.bias [E]   router
    w1         [E, d, h]  b1 [E, h]
    w2         [E, h, o]  b2 [E, o]

DeepSpeed layout (``moe.deepspeed_backend.DeepSpeedSwitchMoE``: ``deepspeed.moe.layer.MoE`` with one
``ExpertFFN`` per expert), on the rank of expert-parallel rank r of ``ep_size``, with L = E / ep_size
local experts numbered i = 0..L-1 (global expert e = r * L + i)::

    deepspeed_moe.gate.wg.weight                           = wg.weight                 (every rank)
    deepspeed_moe.gate.wg.bias                             = wg.bias                   (every rank)
    deepspeed_moe.experts.deepspeed_experts.{i}.fc1.weight = w1[e].T   [h, d]
    deepspeed_moe.experts.deepspeed_experts.{i}.fc1.bias   = b1[e]
    deepspeed_moe.experts.deepspeed_experts.{i}.fc2.weight = w2[e].T   [o, h]
    deepspeed_moe.experts.deepspeed_experts.{i}.fc2.bias   = b2[e]

DeepSpeed's checkpoint files name the same tensors with the *global* id e
(``layer_{l}_expert_{e}_mp_rank_00_model_states.pt``), so a state dict holding all E experts with
ids 0..E-1 (ep_size 1, or merged from a checkpoint) converts to the local layout in one step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping

import torch
from torch import Tensor

LOCAL_KEYS = ("wg.weight", "wg.bias", "w1", "b1", "w2", "b2")
DS_GATE = "deepspeed_moe.gate.wg.weight"
DS_GATE_BIAS = "deepspeed_moe.gate.wg.bias"
DS_EXPERT = "deepspeed_moe.experts.deepspeed_experts."
_DS_EXPERT_KEY = re.compile(r"^deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(fc1|fc2)\.(weight|bias)$")


def local_to_deepspeed(local: Mapping[str, Tensor], experts: range) -> dict[str, Tensor]:
    """Local-layout tensors -> DeepSpeed keys for the global experts ``experts``, renumbered from 0."""
    out = {DS_GATE: local["wg.weight"], DS_GATE_BIAS: local["wg.bias"]}
    for i, e in enumerate(experts):
        p = f"{DS_EXPERT}{i}."
        out[p + "fc1.weight"] = local["w1"][e].t().contiguous()
        out[p + "fc1.bias"] = local["b1"][e].clone()
        out[p + "fc2.weight"] = local["w2"][e].t().contiguous()
        out[p + "fc2.bias"] = local["b2"][e].clone()
    return out


def deepspeed_to_local(ds: Mapping[str, Tensor], num_experts: int) -> dict[str, Tensor]:
    """DeepSpeed keys of *all* experts (ids 0..E-1 are global ids) -> local layout."""
    found = sorted({int(m.group(1)) for k in ds if (m := _DS_EXPERT_KEY.match(k))})
    if found != list(range(num_experts)):
        have = f"experts {found[0]}..{found[-1]}" if found else "no experts"
        raise ValueError(
            f"this state dict holds {have} of a {num_experts}-expert DeepSpeed MoE layer: it comes from one rank of an "
            "expert-parallel model (ep_size > 1), which holds only its local experts. Gather them first: "
            "moe.expert_parallel.local_state_dict(model) or save_export(...) on every rank, or convert a checkpoint with "
            "`python -m train.checkpointing export CHECKPOINT_FOLDER OUT`")
    per = [f"{DS_EXPERT}{e}." for e in range(num_experts)]
    return {
        "wg.weight": ds[DS_GATE],
        "wg.bias": ds[DS_GATE_BIAS],
        "w1": torch.stack([ds[p + "fc1.weight"].t() for p in per]),
        "b1": torch.stack([ds[p + "fc1.bias"] for p in per]),
        "w2": torch.stack([ds[p + "fc2.weight"].t() for p in per]),
        "b2": torch.stack([ds[p + "fc2.bias"] for p in per]),
    }


def take_prefixed(state: MutableMapping[str, Tensor], prefix: str, names) -> dict[str, Tensor]:
    """Pop ``prefix + name`` for each name present; returns ``{name: tensor}``."""
    return {n: state.pop(prefix + n) for n in list(names) if prefix + n in state}


def ds_keys(state: Mapping[str, Tensor], prefix: str) -> list[str]:
    """The DeepSpeed-layout keys (gate and experts) under ``prefix``, without the prefix."""
    return [k[len(prefix):] for k in state if k.startswith(prefix) and (k[len(prefix):] in (DS_GATE, DS_GATE_BIAS)
                                                                       or _DS_EXPERT_KEY.match(k[len(prefix):]))]


_DS_EXPERT_IN_KEY = re.compile(r"((?:^|\.)deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\.)")


def shift_expert_id(key: str, offset: int) -> str:
    """A DeepSpeed-layout key with its expert number moved by ``offset`` (local id -> global id); other keys as they are."""
    return _DS_EXPERT_IN_KEY.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}", key, count=1)


def ds_prefixes(state: Mapping[str, Tensor]) -> list[str]:
    """The module prefixes (``name.``) under which ``state`` holds DeepSpeed-layout MoE keys."""
    return sorted({k[: k.index("deepspeed_moe.")] for k in state if "deepspeed_moe." in k})


def all_to_local(state: Mapping[str, Tensor], num_experts: int) -> dict[str, Tensor]:
    """A whole model's tensors with every DeepSpeed MoE layer (all experts, global ids) in the local layout.
    Works for any tensor keyed like the parameters (weights, or an optimizer's moments of them)."""
    out = dict(state)
    for prefix in ds_prefixes(out):
        names = ds_keys(out, prefix)
        for k, v in deepspeed_to_local(take_prefixed(out, prefix, names), num_experts).items():
            out[prefix + k] = v
    return out
