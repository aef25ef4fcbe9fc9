"""In-batch contrastive loss with duplicate-gold masking and optional extra negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import LossConfig
from moe.units import MoELog


def duplicate_gold_mask(gold_ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """[B, C] bool, True where candidate j is mention i's gold entity but is not column i.

    Column i (i < B) holds mention i's gold entity; columns B.. hold extra negatives. A second
    copy of the gold entity (another mention of the same entity in the batch, or a mined
    negative that happens to be the gold) must not count as a negative.
    """
    same = gold_ids.unsqueeze(1) == candidate_ids.unsqueeze(0)
    diag = torch.zeros_like(same)
    b = gold_ids.shape[0]
    diag[:, :b] = torch.eye(b, dtype=torch.bool, device=same.device)
    return same & ~diag


def contrastive_loss(
    scores: dict[str, Tensor],
    gold_ids: Tensor,
    candidate_ids: Tensor,
    cfg: LossConfig,
    moe_log: MoELog | None = None,
    row_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of each mention against the candidates (its gold at column i), per head.

    scores: {"overall", "text", "vision", "cross"} -> [B, C] with C = B + extra negatives.
    row_weight [B]: per-mention weight of the mean (the training stream gives padding rows 0;
    they still serve as negatives for the others).
    Returns the total loss and its parts (detached) for logging.
    """
    b, c = scores["overall"].shape
    if candidate_ids.shape[0] != c or gold_ids.shape[0] != b or c < b:
        raise ValueError(f"scores {b}x{c} do not fit {gold_ids.shape[0]} golds and {candidate_ids.shape[0]} candidates")
    target = torch.arange(b, device=gold_ids.device)
    mask = duplicate_gold_mask(gold_ids, candidate_ids) if cfg.mask_duplicate_golds else None
    weights = {"overall": cfg.overall_weight, "text": cfg.text_weight, "vision": cfg.vision_weight, "cross": cfg.cross_weight}
    total = scores["overall"].new_zeros((), dtype=torch.float32)
    parts: dict[str, Tensor] = {}
    for head, s in scores.items():
        s = s.float()
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        if row_weight is None:
            ce = F.cross_entropy(s, target)
        else:
            w = row_weight.to(s.device, torch.float32)
            ce = (F.cross_entropy(s, target, reduction="none") * w).sum() / w.sum().clamp_min(1.0)
        parts[f"loss_{head}"] = ce.detach()
        total = total + weights[head] * ce
    if moe_log is not None:
        l_aux, z_loss = moe_log.total()
        total = total + cfg.aux_coef * l_aux.to(total.device) + cfg.z_coef * z_loss.to(total.device)
        parts["loss_aux"] = l_aux.detach()
        parts["loss_z"] = z_loss.detach()
    parts["loss"] = total.detach()
    return total, parts
