"""Everything about the DeepSpeed-MoE switch layers of a model, in one place: finding them, their
layout record, gathering their experts, swapping in local copies, and the expert-parallel gradient
norm. The one DeepSpeed-private call the project needs is wrapped here.

A layer is a DeepSpeed one when its ``backend`` attribute is ``"deepspeed"``
(:class:`moe.deepspeed_backend.DeepSpeedSwitchMoE`); testing the attribute instead of the class keeps
this module free of a DeepSpeed import, which takes seconds, for models that use the local backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe.switch import SwitchMoE


def is_deepspeed_layer(module: nn.Module) -> bool:
    return getattr(module, "backend", None) == "deepspeed"


def deepspeed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The DeepSpeed-backend switch layers, in module order (the same on every rank)."""
    return [(n, m) for n, m in model.named_modules() if is_deepspeed_layer(m)]


def setup_expert_parallel(model: nn.Module) -> None:
    """Create/join the expert-parallel groups of every DeepSpeed MoE layer without ``deepspeed.initialize``
    (unit tests, evaluation scripts); needs ``deepspeed.init_distributed()``."""
    for _, layer in deepspeed_layers(model):
        layer.set_deepspeed_parallelism()


def moe_layout(model: nn.Module) -> dict[str, Any]:
    """How the model's switch layers hold their experts: backend, ep_size and experts per layer."""
    for m in model.modules():
        if is_deepspeed_layer(m):
            return {"backend": "deepspeed", "ep_size": m.ep_size, "num_experts": m.num_experts}
        if isinstance(m, SwitchMoE):
            return {"backend": "local", "ep_size": 1, "num_experts": m.num_experts}
    return {"backend": "none", "ep_size": 1, "num_experts": 0}


def local_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights on CPU in the local layout: every switch layer as stacked ``wg.weight, wg.bias,
    w1, b1, w2, b2`` with all of its experts (mapping: moe/expert_layout.py). For DeepSpeed MoE layers with
    ep_size > 1 this gathers the experts over each expert-parallel group: call it on every rank."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, layer in deepspeed_layers(model):
        prefix = name + "."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update({prefix + k: v for k, v in layer.gathered_local_state().items()})
    return {k: v.cpu().contiguous() for k, v in state.items()}


@contextmanager
def local_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every DeepSpeed MoE layer of ``model`` is swapped for a ``SwitchMoE`` holding
    all of its experts, so ranks may run different numbers of batches (evaluation, KB encoding, mining)
    with no all-to-all. Entering gathers the experts (a collective when ep_size > 1: every rank enters);
    the copies are for inference (training them does not reach the DeepSpeed layers), and the original
    layers come back on exit. A model without DeepSpeed layers is yielded unchanged."""
    swaps = []
    for name, layer in deepspeed_layers(model):
        parent_name, _, attr = name.rpartition(".")
        swaps.append((model.get_submodule(parent_name) if parent_name else model, attr, layer, layer.to_local()))
    try:
        for parent, attr, _, local in swaps:
            setattr(parent, attr, local)
        yield model
    finally:
        for parent, attr, layer, _ in swaps:
            setattr(parent, attr, layer)


def expert_parallel_group(group_name: str):
    """The process group over which DeepSpeed shards the experts named ``group_name``.

    DeepSpeed exposes it only through a private accessor (``groups._get_expert_parallel_group``); it
    is needed to sum expert gradient norms, which DeepSpeed itself reports only through its own
    optimizer wrappers. Wrapped here so that a DeepSpeed upgrade that renames it breaks in one place."""
    from deepspeed.utils import groups  # deepspeed is imported only when expert parallelism is in use

    return groups._get_expert_parallel_group(group_name)


def global_grad_norm(model: nn.Module, device: torch.device, world: int) -> float:
    """The global L2 norm of the gradients, pre-clipping: dense gradients are identical on every rank;
    a DeepSpeed expert's gradient lives on the ranks of its expert-parallel group only, so the
    squared expert norms are summed over that group."""
    from deepspeed.moe.utils import is_moe_param

    dense, expert, group_name = [], [], None
    for p in model.parameters():
        if p.grad is None:
            continue
        if is_moe_param(p):  # DeepSpeed expert weights: each rank holds only its own experts
            expert.append(p.grad)
            group_name = p.group_name
        else:
            dense.append(p.grad)
    square = torch.nn.utils.get_total_norm(dense).pow(2) if dense else torch.zeros(())
    if expert:
        expert_sq = torch.nn.utils.get_total_norm(expert).pow(2).to(device)
        if world > 1:
            dist.all_reduce(expert_sq, group=expert_parallel_group(group_name))
        square = square.to(device) + expert_sq
    return float(square.sqrt())
