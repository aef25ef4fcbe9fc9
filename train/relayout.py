"""Resume a checkpoint on another MoE layout: DeepSpeed expert parallelism with another ep_size, or the
other backend (DeepSpeed MoE <-> local switch layers), optimizer state included.

DeepSpeed cannot do this for its native MoE layers (its universal checkpoint fails on them, DeepSpeed
issue #5716), but our checkpoints hold what is needed: the weights of every expert under its global id
(``layer_{l}_expert_{e}_mp_rank_00_model_states.pt``), the optimizer state of each expert-parallel rank
(``expp_rank_{r}_mp_rank_00_optim_states.pt``; ``mp_rank_00_model_states.pt`` for the local backend),
and, written by every rank, ``optim-params-rank{r}.json``: the parameter name behind each index of that
rank's optimizer state, experts under their global ids. Both the weights and the Adam moments (which have
the weights' shapes) are brought to the local layout (moe/expert_layout.py), then handed to the new
layout exactly as a local-layout state dict is loaded: each rank keeps its own experts. Nothing is
recomputed, so a conversion there and back is bit-identical.

The checkpoint may also hold ZeRO stage 1/2 (or bf16) partitions of another world size: they are joined per
parameter first (train/zero_merge.py; experts by the global ids each rank recorded), and a ZeRO or bf16 engine
takes each whole tensor through DeepSpeed's ``safe_set_full_*`` setters, which cut it for the new world. So the
world size and the MoE layout may change together, at any ZeRO stage 0-2, which DeepSpeed's universal checkpoint
cannot do for its native MoE layers. fp16 (its loss scaler) is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from model import distributed as D
from moe.expert_layout import LOCAL_KEYS, all_to_local, local_to_deepspeed, shift_expert_id
from moe.expert_parallel import deepspeed_layers, moe_layout
from train import zero_merge
from train.checkpointing import MOE_LAYOUT, load_rng, load_weights_only

PARAM_NAMES = "optim-params-rank{rank}.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


class RelayoutError(RuntimeError):
    """The checkpoint cannot be moved to this run's MoE layout; the message says why."""


def optimizer_param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str] | None:
    """The parameter name of each optimizer-state index (the order of ``optimizer.param_groups``), DeepSpeed
    experts under their global ids; None when the optimizer holds other tensors than the module's parameters
    (a bf16/fp16 master copy, ZeRO partitions)."""
    names = {id(p): n for n, p in module.named_parameters()}
    offsets = {name + ".": layer.local_expert_ids().start for name, layer in deepspeed_layers(module)}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                return None
            name = names[id(p)]
            prefix = next((q for q in offsets if name.startswith(q)), None)
            out.append(shift_expert_id(name, offsets[prefix]) if prefix else name)
    return out


def save_param_names(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank: ``optim-params-rank{r}.json`` (nothing when the optimizer is not over the module's parameters)."""
    names = optimizer_param_names(module, optimizer)
    if names is not None:
        (folder / PARAM_NAMES.format(rank=D.rank())).write_text(json.dumps(names))


def saved_layout(folder: Path) -> dict | None:
    """The MoE layout a checkpoint was written with (None: written before layouts were recorded)."""
    path = folder / MOE_LAYOUT
    return json.loads(path.read_text()) if path.is_file() else None


def layout_differs(saved: dict | None, module: nn.Module) -> bool:
    """Whether a checkpoint's MoE layout (``saved_layout``) differs from the module's."""
    return saved is not None and saved != moe_layout(module)


def _saved_states(folder: Path, layout: dict) -> list[tuple[list[str], dict]]:
    """(parameter names, torch optimizer state dict) of each expert-parallel rank of the checkpoint."""
    if layout["backend"] == "deepspeed":
        files = [folder / f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(layout["ep_size"])]
        states = [load_weights_only(f)["optimizer"] for f in files]
    else:
        states = [load_weights_only(folder / "mp_rank_00_model_states.pt")["optimizer"]]
    out = []
    for r, state in enumerate(states):  # global rank r has expert-parallel rank r (DeepSpeed's group order)
        names_file = folder / PARAM_NAMES.format(rank=r)
        if not names_file.is_file():
            raise RelayoutError(f"checkpoint {folder} has no {names_file.name} (written before checkpoints recorded the "
                                "optimizer's parameter names, or by a bf16/ZeRO run): its optimizer state cannot be moved "
                                f"to another MoE layout. Export its weights instead: python -m train.checkpointing export "
                                f"{folder} OUT")
        names = json.loads(names_file.read_text())
        if state is None or len(names) != sum(len(g["params"]) for g in state["param_groups"]):
            raise RelayoutError(f"checkpoint {folder}: the optimizer state of expert-parallel rank {r} does not match "
                                f"{names_file.name}")
        out.append((names, state))
    return out


def _local_weights(folder: Path) -> dict[str, Tensor]:
    state = load_weights_only(folder / "mp_rank_00_model_states.pt")["module"]
    for expert_file in sorted(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(load_weights_only(expert_file))
    return state


def _local_moments(saved: list[tuple[list[str], dict]], num_experts: int) -> tuple[dict[str, dict[str, Tensor]], Tensor]:
    """Each moment of every parameter in the local layout, and the (common) Adam step count."""
    per_name: dict[str, dict[str, Tensor]] = {}
    steps = set()
    for names, state in saved:
        for index, name in enumerate(names):
            entry = state["state"].get(index)
            if entry is None:
                continue  # a parameter that never had a gradient (frozen): no state, as in a fresh optimizer
            per_name.setdefault(name, {m: entry[m] for m in MOMENTS})
            steps.add(float(entry["step"]))
    if len(steps) > 1:
        raise RelayoutError(f"the checkpoint's parameters were stepped a different number of times ({sorted(steps)})")
    moments = {m: all_to_local({n: v[m] for n, v in per_name.items()}, num_experts) for m in MOMENTS}
    step = torch.tensor(steps.pop() if steps else 0.0)
    return {n: {m: moments[m][n] for m in MOMENTS} for n in moments[MOMENTS[0]]}, step


def _for_module(local: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """Local-layout tensors keyed like ``module``'s own parameters: each DeepSpeed layer gets its local experts."""
    out = dict(local)
    for name, layer in deepspeed_layers(module):
        prefix = name + "."
        mine = {k[len(prefix):]: out.pop(k) for k in list(out) if k.startswith(prefix) and k[len(prefix):] in LOCAL_KEYS}
        if mine:
            out.update({prefix + k: v for k, v in local_to_deepspeed(mine, layer.local_expert_ids()).items()})
    return out


def _zero_source(folder: Path, layout: dict) -> tuple[dict[str, Tensor], dict, Tensor, dict, str]:
    """From ZeRO partitions: the local-layout weights, each parameter's fp32 master weight and moments (local
    layout), the step, the groups' learning rates, and where they came from."""
    num_experts = layout["num_experts"]
    weights = _local_weights(folder)  # global names: the shapes of the partitions' flat pieces
    try:
        whole = zero_merge.whole_state(folder)
        state = zero_merge.shaped(whole, {n: t.shape for n, t in weights.items()})
    except zero_merge.MergeError as err:
        raise RelayoutError(str(err)) from None
    parts = {p: all_to_local({n: v[p] for n, v in state.items()}, num_experts) for p in zero_merge.PARTS}
    per_name = {n: {p: parts[p][n] for p in zero_merge.PARTS} for n in parts["fp32"]}
    return (all_to_local(weights, num_experts), per_name, torch.tensor(whole.step), whole.groups,
            f"the ZeRO partitions of {whole.processes} processes merged")


def _stage0_source(folder: Path, layout: dict) -> tuple[dict[str, Tensor], dict, Tensor, dict, str]:
    """The same from a ZeRO stage 0 fp32 checkpoint (the optimizer state is over the module's own parameters)."""
    saved = _saved_states(folder, layout)
    num_experts = layout["num_experts"]
    weights = all_to_local(_local_weights(folder), num_experts)
    moments, step = _local_moments(saved, num_experts)
    per_name = {n: {"fp32": weights[n], **m} for n, m in moments.items()}
    groups = {g.get("name"): g for _, state in saved for g in state["param_groups"]}
    return weights, per_name, step, groups, "whole optimizer state"


def load_relayout(engine, optimizer: torch.optim.Optimizer, folder: Path, layout: dict, world: int) -> str:
    """Load ``folder`` (written by ``world`` processes with MoE ``layout``) into ``engine``, whose MoE layout or
    world size differs: weights, fp32 master weights, Adam moments and steps, learning rates, schedule, step
    counters, RNG. The checkpoint may be ZeRO-partitioned (stage 1/2, bf16: train/zero_merge.py) or not, and so may
    the engine. ``optimizer`` is the client optimizer inside DeepSpeed. Returns what was converted, in words."""
    module = engine.module
    partitioned = bool(zero_merge.rank_files(folder))
    weights, per_name, step, saved_groups, source = (_zero_source if partitioned else _stage0_source)(folder, layout)
    module.load_state_dict(weights)  # each rank keeps its own experts
    targets = {p: _for_module({n: v[p] for n, v in per_name.items()}, module) for p in zero_merge.PARTS}
    _set_rates(optimizer, saved_groups)
    if any(hasattr(p, "_hp_mapping") for p in module.parameters()):
        _set_partitioned(engine, optimizer, targets, step, folder)
    elif optimizer_param_names(module, optimizer) is not None:
        _set_whole(module, optimizer, targets, step, folder)
    else:
        raise RelayoutError(f"checkpoint {folder}: this run's optimizer holds neither the module's parameters nor "
                            "DeepSpeed-partitioned ones (fp16?); its state cannot be set. Resume with the checkpoint's "
                            "world size and MoE layout, or export its weights: python -m train.checkpointing export")
    model_file = load_weights_only(folder / "mp_rank_00_model_states.pt")
    _load_schedule(engine.lr_scheduler, optimizer, model_file["lr_scheduler"])
    engine.global_steps, engine.global_samples = model_file["global_steps"], model_file["global_samples"]
    engine.skipped_steps = model_file["skipped_steps"]
    load_rng(folder)
    now = moe_layout(module)
    changes = [f"MoE layout backend={layout['backend']}, ep_size={layout['ep_size']} -> backend={now['backend']}, "
               f"ep_size={now['ep_size']}"] if {k: layout[k] for k in now} != now else []
    changes += [f"world {world} -> {D.world()}"] if world != D.world() else []
    return (f"{'; '.join(changes) or 'same layout'} (weights, Adam moments and steps, learning rates, schedule; "
            f"{source})")


def _load_schedule(scheduler, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The schedule's position and factor; its per-group lists follow this run's groups (another MoE backend
    has another number of groups: DeepSpeed's experts live in groups of their own), at the rates just set."""
    scheduler.load_state_dict(state)
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports until the next step


def _set_rates(optimizer: torch.optim.Optimizer, saved_groups: dict) -> None:
    for group in optimizer.param_groups:
        # A group the checkpoint lacks is a new home of expert weights (DeepSpeed's per-ep_size groups, or back
        # in the matcher's groups): experts belong to the matcher, so it takes the matcher group's rate.
        source = saved_groups.get(group.get("name")) or saved_groups["matcher_no_decay" if group.get("weight_decay") == 0
                                                                      else "matcher"]
        for key in ("lr", "initial_lr"):
            if key in source:
                group[key] = source[key]


def _set_whole(module: nn.Module, optimizer: torch.optim.Optimizer, targets: dict, step: Tensor, folder: Path) -> None:
    """A ZeRO stage 0 fp32 engine: the client optimizer's state is keyed by the module's parameters."""
    names = {id(p): n for n, p in module.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name not in targets[MOMENTS[0]]:
                continue
            state = {m: targets[m][name].to(p.device, p.dtype).clone() for m in MOMENTS}
            if any(state[m].shape != p.shape for m in MOMENTS):
                raise RelayoutError(f"checkpoint {folder}: the optimizer state of {name} has shape "
                                    f"{tuple(state[MOMENTS[0]].shape)}, the parameter {tuple(p.shape)}")
            optimizer.state[p] = {"step": step.clone(), **state}


def link_partitions(engine, optimizer: torch.optim.Optimizer) -> None:
    """Make every flat fp32 partition of a ZeRO 1/2 or bf16 engine hold Adam moments (zeros where none yet) and
    point each parameter's fragment at them, so that DeepSpeed's ``safe_{get,set}_full_optimizer_state`` work.
    DeepSpeed links them after the first step only, and, stepping one group at a time, only for the groups stepped
    by then; a freshly built engine has no moments at all."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    wrapper = engine.optimizer
    lp_groups = getattr(wrapper, "bit16_groups", None) or wrapper.bf16_groups
    flats = getattr(wrapper, "single_partition_of_fp32_groups", None) or wrapper.fp32_groups_flat_partition
    for lp, flat in zip(lp_groups, flats, strict=True):
        state = optimizer.state[flat]
        for m in MOMENTS:
            state.setdefault(m, torch.zeros_like(flat))
        state.setdefault("step", torch.tensor(0.0))
        lazy_init_hp_params_optimizer_state(lp, flat, optimizer.state)


def _set_partitioned(engine, optimizer: torch.optim.Optimizer, targets: dict, step: Tensor, folder: Path) -> None:
    """A ZeRO stage 1/2 or bf16 engine: DeepSpeed's own setters cut each whole tensor to this rank's fragment."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    link_partitions(engine, optimizer)
    for name, p in engine.module.named_parameters():
        if getattr(p, "_hp_mapping", None) is None:
            continue  # frozen, or wholly in other ranks' partitions
        if name not in targets["fp32"]:
            raise RelayoutError(f"checkpoint {folder} has no optimizer state for {name}")
        if targets["fp32"][name].shape != p.shape:
            raise RelayoutError(f"checkpoint {folder}: the optimizer state of {name} has shape "
                                f"{tuple(targets['fp32'][name].shape)}, the parameter {tuple(p.shape)}")
        safe_set_full_fp32_param(p, targets["fp32"][name].to(p.device, torch.float32))
        for m in MOMENTS:
            safe_set_full_optimizer_state(p, targets[m][name].to(p.device, torch.float32), m)
    for state in optimizer.state.values():  # one entry per flat partition
        state["step"] = step.clone()
