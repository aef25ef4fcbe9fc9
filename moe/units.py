"""The MMoE matching units: intra-level (text, vision) and inter-level (cross) mixtures of experts.

Each unit splits its work into a mention side and an entity side that are computed once per
input, and a pairwise score that combines them. The entity side never depends on the mention,
so a whole KB is encoded once and reused (see ``moe.matcher``).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.typed_config import ConfigError, check_choices, ranged  # light module, no cycle
from moe.layer_spec import LayerSpec, check_ep_size
from moe.switch import MoEOutput, SwitchMoE

Backend = Literal["local", "deepspeed"]


@dataclass
class MoESettings:
    """Switch-MoE hyper-parameters shared by every unit (published: 4 experts, top-k 2-4, FFN
    experts ``d -> 4d -> out`` with GELU).

    ``backend: local`` runs :class:`SwitchMoE` (stacked experts, every expert on every rank);
    ``backend: deepspeed`` runs ``deepspeed.moe.layer.MoE`` (:mod:`moe.deepspeed_backend`) with
    ``ep_size`` ranks sharing each layer's experts (expert parallelism; ep_size must divide both
    num_experts and the number of processes).
    """

    num_experts: int = ranged(4, 1)
    top_k: int = ranged(3, 1)  # <= num_experts (model.config.check_ranges)
    expert_mult: int = ranged(4, 1)  # expert FFN inner width = expert_mult * input width (published: 4)
    capacity_factor: float = ranged(1.0, 0, kind="(]")
    eval_capacity_factor: float = ranged(1.0, 0, kind="(]")
    min_capacity: int = ranged(4, 0)
    drop_tokens: bool = False
    dropped: str = "zero"  # checked by LayerSpec when a layer is built (moe/layer_spec.py: DROPPED_POLICIES)
    backend: Backend = "local"
    # expert-parallel group size (deepspeed backend); no range: check_ep_size (>= 1, divides num_experts) comes first
    ep_size: int = 1

    def __post_init__(self) -> None:
        key = "model.matcher.moe."
        check_choices(self, key)
        check_ep_size(self.ep_size, self.num_experts)
        if self.ep_size > 1 and self.backend != "deepspeed":
            raise ConfigError(f"{key}ep_size: {self.ep_size} needs backend: deepspeed (the local backend keeps every expert "
                              "on every rank)")

    def layer_spec(self, d_model: int, d_out: int, gate_dim: int | None = None, gate: str = "switch") -> LayerSpec:
        """The switch layer ``d_model -> expert_mult * d_model -> d_out`` these settings describe."""
        return LayerSpec(d_model, self.expert_mult * d_model, self.num_experts, self.top_k, d_out=d_out,
                         gate_dim=gate_dim, gate=gate, capacity_factor=self.capacity_factor,
                         eval_capacity_factor=self.eval_capacity_factor, min_capacity=self.min_capacity,
                         drop_tokens=self.drop_tokens, dropped=self.dropped)

    def build(self, d_model: int, d_out: int, gate_dim: int | None = None, gate: str = "switch") -> nn.Module:
        """That layer in the configured backend (same interface: ``layer(x, gate_input) -> MoEOutput``);
        ``gate: published`` only on the local backend."""
        spec = self.layer_spec(d_model, d_out, gate_dim, gate)
        if self.backend == "deepspeed":
            from moe.deepspeed_backend import DeepSpeedSwitchMoE  # imports deepspeed: only when asked for

            return DeepSpeedSwitchMoE(spec, ep_size=self.ep_size)
        return SwitchMoE(spec)


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


def mask_bias(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[M, Lk] additive logit bias: 0 for a real key token, a large negative number for padding, so its
    softmax weight is exactly 0 (no overflow in bf16/fp32, unlike finfo.min plus a negative logit)."""
    neg = max(-1e30, torch.finfo(dtype).min / 4)
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(~key_mask, neg)


def key_bias_column(key: Tensor, key_mask: Tensor) -> Tensor:
    """``key`` [M, Lk, h] with one more column: 0 for a real token, a large negative number for padding.

    Paired with a column of ones appended to the query, the logits GEMM itself adds the padding
    mask, so no masked copy of the attention map is written (a masked_fill on the map costs a pass over
    it). Real tokens get exactly ``+ 1 * 0``: the same logits.
    """
    return torch.cat([key, mask_bias(key_mask, key.dtype).unsqueeze(-1)], dim=-1)


def global_to_local(query: Tensor, query_mask: Tensor, key: Tensor, value: Tensor, key_mask: Tensor) -> Tensor:
    """Cross attention for every (mention, entity) pair, pooled over the query positions.

    query [N, Lq, h] and query_mask [N, Lq] come from the entities; key/value [M, Lk, h] and
    key_mask [M, Lk] from the mentions. Returns [M, N, h]: softmax over mention tokens for each
    entity token, averaged over the entity's real tokens, applied to the mention values (the
    mean is taken before the value product: exact algebra, Lq times fewer value FLOPs).
    Memory is M * N * Lq * Lk; callers bound it by chunking (on CPUs, blocks whose map fits the
    last-level cache are fastest: ``eval.ranking``).
    """
    n, lq, h = query.shape
    m, lk, _ = key.shape
    # One GEMM [N*Lq, h+1] x [h+1, M*Lk] laid out [N, Lq, M, Lk]: the softmax runs over the last dimension and
    # the mean over entity tokens is one batched matvec, with no permuted copy of the attention map
    # (the einsum "nqh,mkh->mnqk" layout costs a full copy of the map). The extra
    # column carries the key padding mask (key_bias_column).
    q = torch.cat([query * (1.0 / math.sqrt(h)), query.new_ones(n, lq, 1)], dim=-1)
    logits = q.reshape(n * lq, h + 1) @ key_bias_column(key, key_mask).reshape(m * lk, h + 1).t()
    attn = torch.softmax(logits.view(n, lq, m, lk), dim=-1)
    qw = query_mask.to(attn.dtype)
    qw = qw / qw.sum(dim=1, keepdim=True).clamp_min(1.0)  # mean over real query tokens
    pooled = torch.bmm(qw.unsqueeze(1), attn.view(n, lq, m * lk)).view(n, m, lk)
    return torch.bmm(pooled.transpose(0, 1), value)  # [M, N, h]


def global_to_local_grouped(query: Tensor, query_mask: Tensor, key: Tensor, value: Tensor, key_mask: Tensor) -> Tensor:
    """:func:`global_to_local` for K candidate entities per mention (re-ranking) instead of all pairs.

    query [M*K, Lq, h] and query_mask [M*K, Lq] are the candidates, mention-major (rows i*K .. i*K+K-1
    belong to mention i); key/value [M, Lk, h] and key_mask [M, Lk] the mentions. Returns [M, K, h].
    Each mention's keys meet all its candidates' queries in one batched GEMM, and the mention side is
    never copied once per candidate.
    """
    m, lk, h = key.shape
    mk, lq, _ = query.shape
    if mk % m:
        raise ValueError(f"{mk} candidate rows are not a whole number of candidates for each of {m} mentions")
    k = mk // m
    # Here the queries are per pair (gathered candidates), so the scale and the mask go on the mention
    # side: scaled keys, and the mask as a bias row that baddbmm writes before the GEMM accumulates.
    bias = mask_bias(key_mask, query.dtype).unsqueeze(1)
    logits = torch.baddbmm(bias.expand(m, k * lq, lk), query.reshape(m, k * lq, h),
                           (key * (1.0 / math.sqrt(h))).transpose(1, 2).to(query.dtype))  # [M, K*Lq, Lk]
    attn = torch.softmax(logits, dim=-1).view(mk, lq, lk)
    qw = query_mask.to(attn.dtype)
    qw = qw / qw.sum(dim=1, keepdim=True).clamp_min(1.0)  # mean over real query tokens
    pooled = torch.bmm(qw.unsqueeze(1), attn).view(m, k, lk)
    return torch.bmm(pooled, value)  # [M, K, h]


def global_to_local_paired(query: Tensor, query_mask: Tensor, key: Tensor, value: Tensor, key_mask: Tensor) -> Tensor:
    """:func:`global_to_local` for P aligned pairs (row p of the entities with row p of the
    mentions) instead of all M x N pairs. Returns [P, h]."""
    return global_to_local_grouped(query, query_mask, key, value, key_mask)[:, 0]


class IntraUnit(nn.Module):
    """Intra-level MoE unit for one modality (the text unit and the vision unit).

    Inputs are the matcher's LayerNormed features: global ``gl`` [B, d] and tokens [B, L, d].
    One switch MoE ``d -> 4d -> h`` runs on ``[gl; tokens]``: routed global g (row 0) and routed
    tokens T (rows 1..L). For a (mention m, entity e) pair:

      g2l = g_e . LN(mean over e's tokens q of softmax_k(Q_e[q] . K_m[k] / sqrt(h)) V_m[k])
      g2g = gl_m . gl_e   (the LayerNormed globals before the MoE)
      score = (g2l + g2g) / 2

    with Q_e = Wq T_e, K_m = Wk T_m, V_m = Wv T_m. Padding tokens are masked out of the keys and
    out of the mean over entity tokens, unless ``masked`` is False (the published code masks
    nothing). The mention's routed global is not used, as published.
    """

    def __init__(self, name: str, d_in: int, hidden: int, moe: MoESettings, *, gate: str = "switch",
                 masked: bool = True) -> None:
        super().__init__()
        self.name, self.masked = name, masked
        self.moe = moe.build(d_in, hidden, gate=gate)
        self.wq = nn.Linear(hidden, hidden)
        self.wk = nn.Linear(hidden, hidden)
        self.wv = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def _route(self, glob: Tensor, tokens: Tensor, log: MoELog) -> tuple[Tensor, Tensor]:
        out = self.moe(torch.cat([glob.unsqueeze(1), tokens], dim=1))
        log.add(self.name, out)
        return out.output[:, 0], out.output[:, 1:]

    def _mask(self, mask: Tensor) -> Tensor:
        return mask if self.masked else torch.ones_like(mask)

    def mention_side(self, glob: Tensor, tokens: Tensor, mask: Tensor, log: MoELog) -> dict[str, Tensor]:
        _, tok = self._route(glob, tokens, log)
        return {"glob": glob, "key": self.wk(tok), "value": self.wv(tok), "mask": self._mask(mask)}

    def entity_side(self, glob: Tensor, tokens: Tensor, mask: Tensor, log: MoELog) -> dict[str, Tensor]:
        g, tok = self._route(glob, tokens, log)
        return {"glob": glob, "g": g, "query": self.wq(tok), "mask": self._mask(mask)}

    def score(self, m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        if not self.masked:
            return self._score_published(m, e)
        ctx = global_to_local(e["query"], e["mask"], m["key"], m["value"], m["mask"])
        g2l = (self.norm(ctx) * e["g"].unsqueeze(0)).sum(-1)
        g2g = m["glob"] @ e["glob"].t()
        return (g2l + g2g) / 2

    def _score_published(self, m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        """The published code's operations in its order (entity-major [N, M, Lq, Lk] attention, value
        product before the mean over entity tokens), so ``compat: published`` reproduces its numbers
        to the bit; the same value as :meth:`score` with all-true masks, up to rounding."""
        query, key, value = e["query"].unsqueeze(1), m["key"].unsqueeze(0), m["value"].unsqueeze(0)
        probs = torch.softmax(torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1]), dim=-1)
        ctx = self.norm(torch.mean(torch.matmul(probs, value), dim=-2))  # [N, M, h]
        g2l = torch.sum(e["g"].unsqueeze(1) * ctx, dim=-1).transpose(0, 1)
        return (g2l + torch.matmul(m["glob"], e["glob"].transpose(-1, -2))) / 2

    def score_candidates(self, m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        """Scores [M, K] of each mention against its own K candidates (``e`` rows mention-major)."""
        ctx = global_to_local_grouped(e["query"], e["mask"], m["key"], m["value"], m["mask"])  # [M, K, h]
        n_m, k = ctx.shape[:2]
        g2l = (self.norm(ctx) * e["g"].view(n_m, k, -1)).sum(-1)
        g2g = torch.bmm(e["glob"].view(n_m, k, -1), m["glob"].unsqueeze(-1)).squeeze(-1)
        return (g2l + g2g) / 2


def align_length(tokens: Tensor, length: int) -> Tensor:
    """Resample a token sequence to ``length`` positions (identity when already that long).

    The cross unit's gate reads the other modality's tokens position by position; the published
    model needs as many text tokens as image tokens (50 and 50 with CLIP ViT-B/32). Other sizes
    (the synthetic presets) are average-pooled to the routed sequence's length.
    """
    if tokens.shape[1] == length:
        return tokens
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), length).transpose(1, 2)


CrossGate = Literal["context", "global"]
CROSS_GATES = typing.get_args(CrossGate)


class CrossUnit(nn.Module):
    """Inter-level MoE unit.

    Text and image features are projected to a common width c (``text_fc``, ``image_fc``): tc', tt',
    ic', it'. ONE MoE layer serves both directions: a = [tc'; it'] is routed with the gate reading
    b = [ic'; tt'], and b with the gate reading a. From the routed a: t (row 0) and image tokens I;
    from the routed b: i (row 0) and text tokens T. Then, per input (no pair interaction):

      text->image:  ctx = softmax(t . I^T) I;   v_t2i = LN(tc' * tanh(gate_fc(s)) + ctx)
      image->text:  ctx = softmax(i . T^T) T;   v_i2t = LN(ic' * tanh(gate_fc(s)) + ctx)

    where the scalar gate reads s = ctx (``gate_source: context``) or s = tc' / ic' (``global``) on
    both sides; the published code reads ctx on the entity side and tc' / ic' on the mention side
    (``gate_source: published``). Text padding is masked out of T unless ``masked`` is False.
    Pair score = (v_t2i_m . v_t2i_e + v_i2t_m . v_i2t_e) / 2: separable, an inner product of 2c-dim
    vectors (FAISS-indexable).
    """

    def __init__(self, d_text: int, d_image: int, dim: int, moe: MoESettings, *, gate: str = "switch",
                 gate_source: str = "context", masked: bool = True) -> None:
        super().__init__()
        if gate_source not in CROSS_GATES + ("published",):
            raise ConfigError(f"model.matcher.cross_gate: expected one of {CROSS_GATES}, got {gate_source!r}")
        self.gate_source, self.masked = gate_source, masked
        self.text_fc = nn.Linear(d_text, dim)
        self.image_fc = nn.Linear(d_image, dim)
        self.moe = moe.build(dim, dim, gate_dim=dim, gate=gate)
        self.gate_fc = nn.Linear(dim, 1)
        self.gate_norm = nn.LayerNorm(dim)

    def _pool(self, glob: Tensor, tokens: Tensor, mask: Tensor | None, orig: Tensor, mention: bool) -> Tensor:
        logits = torch.matmul(glob.unsqueeze(1), tokens.transpose(-1, -2))  # [B, 1, L]
        if mask is not None:
            logits = masked_logits(logits, mask.unsqueeze(1))
        ctx = torch.matmul(torch.softmax(logits, dim=-1), tokens).squeeze(1)
        use_global = self.gate_source == "global" or (self.gate_source == "published" and mention)
        gate = torch.tanh(self.gate_fc(orig if use_global else ctx))
        return self.gate_norm(orig * gate + ctx)

    def side(self, tc: Tensor, tt: Tensor, text_mask: Tensor, ic: Tensor, it: Tensor, log: MoELog, *,
             mention: bool) -> dict[str, Tensor]:
        tc, tt, ic, it = self.text_fc(tc), self.text_fc(tt), self.image_fc(ic), self.image_fc(it)
        seq_a = torch.cat([tc.unsqueeze(1), it], dim=1)
        seq_b = torch.cat([ic.unsqueeze(1), tt], dim=1)
        gate_a = torch.cat([ic.unsqueeze(1), align_length(tt, it.shape[1])], dim=1)
        gate_b = torch.cat([tc.unsqueeze(1), align_length(it, tt.shape[1])], dim=1)
        out_a = self.moe(seq_a, gate_a)
        out_b = self.moe(seq_b, gate_b)
        log.add("cross", out_a)
        log.add("cross", out_b)
        a, b = out_a.output, out_b.output
        t2i = self._pool(a[:, 0], a[:, 1:], None, tc, mention)
        i2t = self._pool(b[:, 0], b[:, 1:], text_mask if self.masked else None, ic, mention)
        return {"t2i": t2i, "i2t": i2t}

    @staticmethod
    def score(m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        return (m["t2i"] @ e["t2i"].t() + m["i2t"] @ e["i2t"].t()) / 2

    @staticmethod
    def score_candidates(m: dict[str, Tensor], e: dict[str, Tensor]) -> Tensor:
        n_m = m["t2i"].shape[0]
        dot = lambda name: torch.bmm(e[name].view(n_m, -1, e[name].shape[-1]), m[name].unsqueeze(-1)).squeeze(-1)  # noqa: E731
        return (dot("t2i") + dot("i2t")) / 2
