"""The MMoE matching units: intra-level (text, vision) and inter-level (cross) mixtures of experts.

Each unit splits its work into a mention side and an entity side that are computed once per
input, and a pairwise score that combines them. The entity side never depends on the mention,
so a whole KB is encoded once and reused (see ``moe.matcher``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.switch import MoEOutput, SwitchMoE
from train.typed_config import ConfigError  # a ValueError; light module, no cycle

BACKENDS = ("local", "deepspeed")


@dataclass
class MoESettings:
    """Switch-MoE hyper-parameters shared by every unit.

    ``backend: local`` runs :class:`SwitchMoE` (stacked experts, every expert on every rank);
    ``backend: deepspeed`` runs ``deepspeed.moe.layer.MoE`` (:mod:`moe.deepspeed_backend`) with
    ``ep_size`` ranks sharing each layer's experts (expert parallelism; ep_size must divide both
    num_experts and the number of processes).
    """

    num_experts: int = 4
    top_k: int = 3
    expert_hidden: int = 96
    gate: str = "switch"
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = False
    dropped: str = "zero"
    backend: str = "local"  # local | deepspeed
    ep_size: int = 1  # expert-parallel group size (deepspeed backend)

    def __post_init__(self) -> None:
        key = "model.matcher.moe."
        if self.backend not in BACKENDS:
            raise ConfigError(f"{key}backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ConfigError(f"{key}ep_size: {self.ep_size} must be >= 1 and divide num_experts ({self.num_experts})")
        if self.ep_size > 1 and self.backend != "deepspeed":
            raise ConfigError(f"{key}ep_size: {self.ep_size} needs backend: deepspeed (the local backend keeps every expert "
                              "on every rank)")
        if self.backend == "deepspeed" and self.gate != "switch":
            raise ConfigError(f"{key}gate: {self.gate!r} exists only in the local backend; the deepspeed backend routes "
                              "with the switch gate")

    def build(self, d_model: int, gate_dim: int | None = None) -> nn.Module:
        """A switch layer of the configured backend (same interface: ``layer(x, gate_input) -> MoEOutput``)."""
        if self.backend == "deepspeed":
            from moe.deepspeed_backend import DeepSpeedSwitchMoE  # imports deepspeed: only when asked for

            return DeepSpeedSwitchMoE(d_model, self.expert_hidden, self.num_experts, self.top_k, gate_dim=gate_dim,
                                      ep_size=self.ep_size, capacity_factor=self.capacity_factor,
                                      eval_capacity_factor=self.eval_capacity_factor, min_capacity=self.min_capacity,
                                      drop_tokens=self.drop_tokens, dropped=self.dropped)
        return SwitchMoE(
            d_model,
            self.expert_hidden,
            self.num_experts,
            self.top_k,
            gate_dim=gate_dim,
            gate=self.gate,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            min_capacity=self.min_capacity,
            drop_tokens=self.drop_tokens,
            dropped=self.dropped,
        )


class MoELog:
    """Collects the MoE outputs of one side's forward pass: losses and expert load."""

    def __init__(self) -> None:
        self.l_aux: list[Tensor] = []
        self.z_loss: list[Tensor] = []
        self.load: dict[str, tuple[Tensor, Tensor]] = {}

    def add(self, name: str, out: MoEOutput) -> None:
        self.l_aux.append(out.l_aux)
        self.z_loss.append(out.z_loss)
        counts, dropped = self.load.get(name, (0, 0))
        self.load[name] = (counts + out.expert_counts.detach(), dropped + out.dropped_tokens.detach())

    def merge(self, other: MoELog) -> None:
        self.l_aux += other.l_aux
        self.z_loss += other.z_loss
        for name, (c, d) in other.load.items():
            c0, d0 = self.load.get(name, (0, 0))
            self.load[name] = (c0 + c, d0 + d)

    def total(self) -> tuple[Tensor, Tensor]:
        zero = torch.zeros(())
        return (torch.stack(self.l_aux).sum() if self.l_aux else zero, torch.stack(self.z_loss).sum() if self.z_loss else zero)


def masked_logits(logits: Tensor, key_mask: Tensor) -> Tensor:
    return logits.masked_fill(~key_mask, torch.finfo(logits.dtype).min)


def global_to_local(query: Tensor, query_mask: Tensor, key: Tensor, value: Tensor, key_mask: Tensor) -> Tensor:
    """Cross attention for every (mention, entity) pair, pooled over the query positions.

    query [N, Lq, h] and query_mask [N, Lq] come from the entities; key/value [M, Lk, h] and
    key_mask [M, Lk] from the mentions. Returns [M, N, h]: softmax over mention tokens for each
    entity token, averaged over the entity's real tokens, applied to the mention values.
    Memory is M * N * Lq * Lk; callers bound it by chunking.
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    logits = torch.einsum("nqh,mkh->mnqk", query, key) * scale
    attn = torch.softmax(masked_logits(logits, key_mask[:, None, None, :]), dim=-1)
    qw = query_mask.to(attn.dtype)
    qw = qw / qw.sum(dim=1, keepdim=True).clamp_min(1.0)  # mean over real query tokens
    pooled = torch.einsum("mnqk,nq->mnk", attn, qw)
    return torch.einsum("mnk,mkh->mnh", pooled, value)


def global_to_local_paired(query: Tensor, query_mask: Tensor, key: Tensor, value: Tensor, key_mask: Tensor) -> Tensor:
    """:func:`global_to_local` for P aligned pairs (row p of the entities with row p of the
    mentions) instead of all M x N pairs. Returns [P, h]."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    logits = torch.einsum("pqh,pkh->pqk", query, key) * scale
    attn = torch.softmax(masked_logits(logits, key_mask[:, None, :]), dim=-1)
    qw = query_mask.to(attn.dtype)
    qw = qw / qw.sum(dim=1, keepdim=True).clamp_min(1.0)
    pooled = torch.einsum("pqk,pq->pk", attn, qw)
    return torch.einsum("pk,pkh->ph", pooled, value)


class IntraUnit(nn.Module):
    """Intra-level MoE unit for one modality (the text unit and the vision unit).

    Per input: [global; tokens] -> Linear(d_in, h) -> switch MoE -> routed global g and tokens.
    Pair score = mean of
      g2l: LayerNorm(global-to-local attention, entity tokens attend over mention tokens) . g_entity
      g2g: g_mention . g_entity
    """

    def __init__(self, name: str, d_in: int, hidden: int, moe: MoESettings) -> None:
        super().__init__()
        self.name = name
        self.in_proj = nn.Linear(d_in, hidden)
        self.moe = moe.build(hidden)
        self.wq = nn.Linear(hidden, hidden)
        self.wk = nn.Linear(hidden, hidden)
        self.wv = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def _route(self, glob: Tensor, tokens: Tensor, log: MoELog) -> tuple[Tensor, Tensor]:
        seq = self.in_proj(torch.cat([glob.unsqueeze(1), tokens], dim=1))
        out = self.moe(seq)
        log.add(self.name, out)
        return out.output[:, 0], out.output[:, 1:]

    def mention_side(self, glob: Tensor, tokens: Tensor, mask: Tensor, log: MoELog) -> dict[str, Tensor]:
        g, tok = self._route(glob, tokens, log)
        return {"g": g, "key": self.wk(tok), "value": self.wv(tok), "mask": mask}

    def entity_side(self, glob: Tensor, tokens: Tensor, mask: Tensor, log: MoELog) -> dict[str, Tensor]:
        g, tok = self._route(glob, tokens, log)
        return {"g": g, "query": self.wq(tok), "mask": mask}

    def score(self, m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        ctx = global_to_local(e["query"], e["mask"], m["key"], m["value"], m["mask"])
        g2l = (self.norm(ctx) * e["g"].unsqueeze(0)).sum(-1)
        g2g = m["g"] @ e["g"].t()
        return (g2l + g2g) / 2

    def score_pairs(self, m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        ctx = global_to_local_paired(e["query"], e["mask"], m["key"], m["value"], m["mask"])
        return ((self.norm(ctx) * e["g"]).sum(-1) + (m["g"] * e["g"]).sum(-1)) / 2


def align_length(tokens: Tensor, length: int) -> Tensor:
    """Resample a token sequence to ``length`` positions (identity when already that long).

    The cross unit's gate reads the other modality's tokens position by position; with CLIP
    ViT-B/32 and 50 text tokens both sequences have 50 positions, other encoders may differ.
    """
    if tokens.shape[1] == length:
        return tokens
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), length).transpose(1, 2)


class GatedAttentionPool(nn.Module):
    """A global vector attends over tokens; a tanh gate mixes the context in; LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, glob: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        logits = torch.einsum("bh,blh->bl", self.wq(glob), self.wk(tokens)) / math.sqrt(glob.shape[-1])
        attn = torch.softmax(masked_logits(logits, mask), dim=-1)
        ctx = torch.einsum("bl,blh->bh", attn, self.wv(tokens))
        mix = torch.tanh(self.gate(torch.cat([glob, ctx], dim=-1)))
        return self.norm(glob + mix * ctx)


class CrossUnit(nn.Module):
    """Inter-level MoE unit.

    Text and image features are projected to a common width c. One MoE transforms
    [text global; image tokens] while its gate reads [image global; text tokens]; the other
    transforms [image global; text tokens] while its gate reads [text global; image tokens].
    The routed text global attends over the routed image tokens (text->image) and the routed
    image global over the routed text tokens (image->text), each through a tanh-gated pool.
    Pair score = mean of the two directions' dot products. Separable: each side is computed
    alone, so the score is an inner product of 2c-dim vectors (FAISS-indexable).
    """

    def __init__(self, d_text: int, d_image: int, dim: int, moe: MoESettings) -> None:
        super().__init__()
        self.text_proj = nn.Linear(d_text, dim)
        self.image_proj = nn.Linear(d_image, dim)
        self.moe_t2i = moe.build(dim, gate_dim=dim)
        self.moe_i2t = moe.build(dim, gate_dim=dim)
        self.pool_t2i = GatedAttentionPool(dim)
        self.pool_i2t = GatedAttentionPool(dim)

    def side(
        self, text_g: Tensor, text_tok: Tensor, text_mask: Tensor, image_g: Tensor, image_tok: Tensor, log: MoELog
    ) -> dict[str, Tensor]:
        tg, tt = self.text_proj(text_g), self.text_proj(text_tok)
        ig, it = self.image_proj(image_g), self.image_proj(image_tok)
        seq_a = torch.cat([tg.unsqueeze(1), it], dim=1)
        gate_a = torch.cat([ig.unsqueeze(1), align_length(tt, it.shape[1])], dim=1)
        seq_b = torch.cat([ig.unsqueeze(1), tt], dim=1)
        gate_b = torch.cat([tg.unsqueeze(1), align_length(it, tt.shape[1])], dim=1)
        out_a = self.moe_t2i(seq_a, gate_a)
        out_b = self.moe_i2t(seq_b, gate_b)
        log.add("cross_t2i", out_a)
        log.add("cross_i2t", out_b)
        image_mask = torch.ones(it.shape[:2], dtype=torch.bool, device=it.device)
        t2i = self.pool_t2i(out_a.output[:, 0], out_a.output[:, 1:], image_mask)
        i2t = self.pool_i2t(out_b.output[:, 0], out_b.output[:, 1:], text_mask)
        return {"t2i": t2i, "i2t": i2t}

    @staticmethod
    def score(m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        return (m["t2i"] @ e["t2i"].t() + m["i2t"] @ e["i2t"].t()) / 2

    @staticmethod
    def score_pairs(m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        return ((m["t2i"] * e["t2i"]).sum(-1) + (m["i2t"] * e["i2t"]).sum(-1)) / 2
