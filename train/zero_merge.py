"""Whole per-parameter optimizer state from the partitions of a ZeRO stage 1/2 (or DeepSpeed bf16) checkpoint.

Each rank's ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (``bf16_zero_pp_rank_...`` for the bf16 optimizer)
holds, for every parameter group, the rank's slice of the group's flat fp32 master weights and of each Adam
moment, and ``param_slice_mappings``: where each parameter's piece lies in that slice. A parameter's pieces,
joined in rank order, are the parameter flattened (a group's partitions are contiguous and cut in rank order;
the padding at the end of the last one belongs to no parameter). Expert weights of DeepSpeed's MoE layers are
partitioned over their expert-data-parallel group only, and named there by their *local* expert number: every
rank records the global names of its experts at save time (``expert-ids-rank{r}.json``), so the pieces of each
global expert come together whatever the old ep_size was.

This is what DeepSpeed's universal checkpoint cannot do for its native MoE layers (DeepSpeed issue #5716); the
loading side is train/relayout.py, which hands each parameter its whole state through DeepSpeed's own
``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``, so the new engine cuts it for its own world.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from model import distributed as D
from moe.expert_layout import DS_EXPERT, shift_expert_id
from moe.expert_parallel import deepspeed_layers
from train.checkpointing import load_weights_only
from train.universal import partitioned_files

EXPERT_IDS = "expert-ids-rank{rank}.json"
PARTS = ("fp32", "exp_avg", "exp_avg_sq")  # per parameter: master weight and Adam moments
_RANK_IN_NAME = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


class MergeError(RuntimeError):
    """The checkpoint's ZeRO partitions cannot be joined; the message says why."""


@dataclass
class WholeState:
    """Every parameter's whole, flat state, by global name (experts under their global ids)."""

    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # name -> {"fp32", "exp_avg", "exp_avg_sq"}
    step: float = 0.0  # Adam's step count (the same for every group)
    groups: dict[str, dict] = field(default_factory=dict)  # group name -> {"lr", "initial_lr"}
    processes: int = 0  # the world size that wrote the partitions


def expert_names(module: nn.Module) -> dict[str, str]:
    """This rank's DeepSpeed expert parameters: module name (local expert number) -> global name."""
    out = {}
    for prefix, layer in deepspeed_layers(module):
        offset = layer.local_expert_ids().start
        for name, _ in layer.named_parameters(prefix=prefix):
            if DS_EXPERT in name:
                out[name] = shift_expert_id(name, offset)
    return out


def save_expert_names(module: nn.Module, folder: Path) -> None:
    """Every rank: ``expert-ids-rank{r}.json`` (nothing without DeepSpeed MoE layers)."""
    names = expert_names(module)
    if names:
        (folder / EXPERT_IDS.format(rank=D.rank())).write_text(json.dumps(names))


def rank_files(folder: Path) -> list[Path]:
    """The partition files, in rank order; refuses a gap (a rank's file missing)."""
    found = {}
    for path in partitioned_files(folder):
        m = _RANK_IN_NAME.search(path.name)
        if m:
            found[int(m.group(1))] = path
    if sorted(found) != list(range(len(found))):
        raise MergeError(f"checkpoint {folder} has the optimizer partitions of ranks {sorted(found)}: one is missing")
    return [found[r] for r in range(len(found))]


def whole_state(folder: Path) -> WholeState:
    """Join the ZeRO partitions of ``folder`` into each parameter's whole state (CPU tensors, flat)."""
    files = rank_files(folder)
    pieces: dict[str, dict[str, list[Tensor]]] = {}
    steps: set[float] = set()
    out = WholeState(processes=len(files))
    for rank, path in enumerate(files):
        sd = load_weights_only(path)["optimizer_state_dict"]
        renames = folder / EXPERT_IDS.format(rank=rank)
        rename = json.loads(renames.read_text()) if renames.is_file() else {}
        base = sd["base_optimizer_state"]
        for g, (flat, where) in enumerate(zip(sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"], strict=True)):
            group = base["param_groups"][g]
            out.groups.setdefault(group.get("name"), {k: group[k] for k in ("lr", "initial_lr") if k in group})
            state = base["state"].get(g)
            if state is None:
                raise MergeError(f"checkpoint {folder}: parameter group {g} of rank {rank} was never stepped (no Adam "
                                 "moments to carry over)")
            steps.add(float(state["step"]))
            for name, frag in where.items():
                if DS_EXPERT in name and name not in rename:
                    raise MergeError(f"checkpoint {folder} has no global expert ids for rank {rank} ({renames.name}, "
                                     "written by checkpoints of this trainer since expert relayout under ZeRO): its "
                                     "experts cannot be told apart. Resume on its world size and MoE layout, or export "
                                     "its weights: python -m train.checkpointing export")
                cut = slice(frag.start, frag.start + frag.numel)
                entry = pieces.setdefault(rename.get(name, name), {p: [] for p in PARTS})
                for part, source in zip(PARTS, (flat, state["exp_avg"], state["exp_avg_sq"]), strict=True):
                    entry[part].append(source[cut])
    if len(steps) > 1:
        raise MergeError(f"checkpoint {folder}: its parameter groups were stepped a different number of times "
                         f"({sorted(steps)})")
    out.step = steps.pop() if steps else 0.0
    out.tensors = {name: {p: torch.cat(v[p]).float() for p in PARTS} for name, v in pieces.items()}
    return out


def shaped(whole: WholeState, shapes: dict[str, torch.Size]) -> dict[str, dict[str, Tensor]]:
    """``whole``'s flat tensors in the parameters' shapes (``shapes``: global name -> shape, from the weights)."""
    out = {}
    for name, parts in whole.tensors.items():
        if name not in shapes:
            raise MergeError(f"the optimizer partitions hold {name}, which the checkpoint's weights do not")
        if parts["fp32"].numel() != shapes[name].numel():
            raise MergeError(f"the optimizer partitions hold {parts['fp32'].numel()} values of {name}, the weight has "
                             f"{shapes[name].numel()} ({tuple(shapes[name])}): a partition is missing or damaged")
        out[name] = {p: t.view(shapes[name]) for p, t in parts.items()}
    return out
