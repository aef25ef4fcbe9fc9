"""The matcher against the published MMoE equations (docs/model.md), computed independently.

The reference below is written from the equations alone: explicit loops over pairs, tokens and
experts, plain matmuls, its own LayerNorm, softmax and gates. It reads the weights by name from
the published-style state dict (``ours_to_published``) and shares no code with ``moe/``.
"""

import math

import pytest
import torch

from moe.features import Features
from moe.matcher import MatcherSettings, MMoEMatcher
from moe.published import load_published_matcher, ours_to_published, published_matcher
from moe.units import MoESettings

DT, DV, H, C, E, L = 6, 4, 5, 3, 4, 5  # L text tokens = P image tokens, as the published model needs


def ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def linear(x, W, b):
    return x @ W.t() + b


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def softmax(v):
    z = torch.exp(v - v.max())
    return z / z.sum()


def expert(P, prefix, e, x):
    h = gelu(linear(x, P[f"{prefix}.moe_layer.experts.{e}.ff.0.0.weight"], P[f"{prefix}.moe_layer.experts.{e}.ff.0.0.bias"]))
    return linear(h, P[f"{prefix}.moe_layer.experts.{e}.ff.2.weight"], P[f"{prefix}.moe_layer.experts.{e}.ff.2.bias"])


def switch_moe(P, prefix, x, gate_in, k):
    """Per-token top-k: softmax over experts, keep the k best, renormalise (k >= 2), mix."""
    rows = []
    for t in range(x.shape[0]):
        p = softmax(linear(gate_in[t], P[f"{prefix}.moe_layer.gate.w_gate.weight"], P[f"{prefix}.moe_layer.gate.w_gate.bias"]))
        best = sorted(range(E), key=lambda e: -p[e].item())[:k]
        total = sum(p[e] for e in best) if k > 1 else 1.0
        rows.append(sum(p[e] / total * expert(P, prefix, e, x[t]) for e in best))
    return torch.stack(rows)


def published_moe(P, prefix, xs, gates, k):
    """The published gate over a whole batch: mask[n, idx[n, l, j], j] = 1, normalise over the batch."""
    n_rows, length = len(xs), xs[0].shape[0]
    probs = [[softmax(linear(gates[n][t], P[f"{prefix}.moe_layer.gate.w_gate.weight"],
                             P[f"{prefix}.moe_layer.gate.w_gate.bias"])) for t in range(length)] for n in range(n_rows)]
    mask = torch.zeros(n_rows, length, E)
    for n in range(n_rows):
        for t in range(length):
            best = sorted(range(E), key=lambda e: -probs[n][t][e].item())[:k]
            for j, e in enumerate(best):
                mask[n, e, j] = 1.0
    g = torch.stack([torch.stack(probs[n]) for n in range(n_rows)]) * mask
    g = g / (g.sum(0, keepdim=True) + 1e-6) * n_rows
    return [torch.stack([sum(g[n, t, e] * expert(P, prefix, e, xs[n][t]) for e in range(E)) for t in range(length)])
            for n in range(n_rows)]


def reference_scores(P, m, e, k, compat, cross_gate="context"):
    """Scores [M, N] per unit from the equations. m and e: dicts of raw features and text masks."""
    def norms(f):
        return (ln(f["tg"], P["text_cls_layernorm.weight"], P["text_cls_layernorm.bias"]),
                ln(f["tt"], P["text_tokens_layernorm.weight"], P["text_tokens_layernorm.bias"]),
                ln(f["ig"], P["image_cls_layernorm.weight"], P["image_cls_layernorm.bias"]),
                ln(f["it"], P["image_tokens_layernorm.weight"], P["image_tokens_layernorm.bias"]))

    mn, en = norms(m), norms(e)
    M, N = m["tg"].shape[0], e["tg"].shape[0]

    def routed(prefix, side, glob_i, tok_i):
        seqs = [torch.cat([side[glob_i][i : i + 1], side[tok_i][i]]) for i in range(side[0].shape[0])]
        if compat:
            return published_moe(P, prefix, seqs, seqs, k)
        return [switch_moe(P, prefix, s, s, k) for s in seqs]

    out = {}
    for unit, prefix, gi, ti in (("text", "text_module", 0, 1), ("vision", "vision_module", 2, 3)):
        rm, re_ = routed(prefix, mn, gi, ti), routed(prefix, en, gi, ti)
        s = torch.zeros(M, N)
        for a in range(M):
            keys = linear(rm[a][1:], P[f"{prefix}.fc_key.weight"], P[f"{prefix}.fc_key.bias"])
            vals = linear(rm[a][1:], P[f"{prefix}.fc_value.weight"], P[f"{prefix}.fc_value.bias"])
            kmask = m["mask"][a] if (unit == "text" and not compat) else torch.ones(L, dtype=torch.bool)
            for b in range(N):
                qs = linear(re_[b][1:], P[f"{prefix}.fc_query.weight"], P[f"{prefix}.fc_query.bias"])
                qmask = e["mask"][b] if (unit == "text" and not compat) else torch.ones(L, dtype=torch.bool)
                ctxs = []
                for q in range(L):
                    if not qmask[q]:
                        continue
                    logits = torch.stack([qs[q] @ keys[t] / math.sqrt(H) for t in range(L) if kmask[t]])
                    w = softmax(logits)
                    kept = [t for t in range(L) if kmask[t]]
                    ctxs.append(sum(w[i] * vals[t] for i, t in enumerate(kept)))
                ctx = ln(torch.stack(ctxs).mean(0), P[f"{prefix}.layer_norm.weight"], P[f"{prefix}.layer_norm.bias"])
                g2l = re_[b][0] @ ctx
                g2g = mn[gi][a] @ en[gi][b]
                s[a, b] = (g2l + g2g) / 2
        out[unit] = s

    def cross_side(side, raw_mask, mention):
        tc = linear(side[0], P["cross_module.text_fc.weight"], P["cross_module.text_fc.bias"])
        tt = linear(side[1], P["cross_module.text_fc.weight"], P["cross_module.text_fc.bias"])
        ic = linear(side[2], P["cross_module.image_fc.weight"], P["cross_module.image_fc.bias"])
        it = linear(side[3], P["cross_module.image_fc.weight"], P["cross_module.image_fc.bias"])
        n = tc.shape[0]
        a = [torch.cat([tc[i : i + 1], it[i]]) for i in range(n)]
        b = [torch.cat([ic[i : i + 1], tt[i]]) for i in range(n)]
        if compat:
            ra, rb = published_moe(P, "cross_module", a, b, k), published_moe(P, "cross_module", b, a, k)
        else:
            ra = [switch_moe(P, "cross_module", a[i], b[i], k) for i in range(n)]
            rb = [switch_moe(P, "cross_module", b[i], a[i], k) for i in range(n)]
        vecs = []
        for i in range(n):
            res = []
            for routed_seq, orig, tmask in ((ra[i], tc[i], None), (rb[i], ic[i], raw_mask[i])):
                glob, toks = routed_seq[0], routed_seq[1:]
                keep = [t for t in range(L) if tmask is None or compat or tmask[t]]
                w = softmax(torch.stack([glob @ toks[t] for t in keep]))
                ctx = sum(w[j] * toks[t] for j, t in enumerate(keep))
                src = orig if (cross_gate == "global" or (compat and mention)) else ctx
                gate = torch.tanh(linear(src, P["cross_module.gate_fc.weight"], P["cross_module.gate_fc.bias"]))
                norm_w, norm_b = P["cross_module.gate_layer_norm.weight"], P["cross_module.gate_layer_norm.bias"]
                res.append(ln(orig * gate + ctx, norm_w, norm_b))
            vecs.append(res)
        return vecs

    cm, ce = cross_side(mn, m["mask"], True), cross_side(en, e["mask"], False)
    out["cross"] = torch.tensor([[(cm[a][0] @ ce[b][0] + cm[a][1] @ ce[b][1]).item() / 2 for b in range(N)] for a in range(M)])
    out["overall"] = (out["text"] + out["vision"] + out["cross"]) / 3
    return out


def raw_inputs(n, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (n,), generator=g) if pad else torch.full((n,), L)
    return {"tg": torch.randn(n, DT, generator=g), "tt": torch.randn(n, L, DT, generator=g),
            "ig": torch.randn(n, DV, generator=g), "it": torch.randn(n, L, DV, generator=g),
            "mask": torch.arange(L)[None, :] < lengths[:, None]}


def features(r):
    return Features(r["tg"], r["tt"], r["mask"], r["ig"], r["it"], torch.ones(r["tg"].shape[0], dtype=torch.bool))


def small_matcher(k, compat="none", cross_gate="context", seed=0):
    torch.manual_seed(seed)
    m = MMoEMatcher(MatcherSettings(text_dim=DT, image_dim=DV, hidden=H, cross_dim=C, compat=compat, cross_gate=cross_gate,
                                    moe=MoESettings(num_experts=E, top_k=k)))
    with torch.no_grad():  # non-trivial LayerNorm affines, so a swapped or missing norm shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def our_scores(matcher, m, e):
    with torch.no_grad():
        return matcher.score(matcher.mention_side(features(m))[0], matcher.entity_side(features(e))[0])


@pytest.mark.parametrize("k,cross_gate", [(2, "context"), (3, "global"), (1, "context")])
def test_default_model_equals_the_equations_with_padding_masked(k, cross_gate):
    matcher = small_matcher(k, cross_gate=cross_gate, seed=k)
    m, e = raw_inputs(3, 1), raw_inputs(4, 2)
    assert not m["mask"].all() and not e["mask"].all(), "the example must hold padding"
    ref = reference_scores(ours_to_published(matcher), m, e, k, compat=False, cross_gate=cross_gate)
    ours = our_scores(matcher, m, e)
    for unit in ("text", "vision", "cross", "overall"):
        torch.testing.assert_close(ours[unit], ref[unit], rtol=1e-4, atol=1e-4, msg=unit)


@pytest.mark.parametrize("k", [2, 3])
def test_published_compat_equals_the_published_equations_defects_included(k):
    matcher = small_matcher(k, compat="published", seed=10 + k)
    m, e = raw_inputs(3, 3), raw_inputs(5, 4)
    ref = reference_scores(ours_to_published(matcher), m, e, k, compat=True)
    ours = our_scores(matcher, m, e)
    for unit in ("text", "vision", "cross", "overall"):
        torch.testing.assert_close(ours[unit], ref[unit], rtol=1e-4, atol=1e-4, msg=unit)


def test_published_compat_scores_change_with_the_block_exactly_as_its_gate_dictates():
    matcher = small_matcher(2, compat="published", seed=5)
    P = ours_to_published(matcher)
    m, e = raw_inputs(2, 5), raw_inputs(6, 6)
    first3 = {key: v[:3] for key, v in e.items()}
    alone = our_scores(matcher, m, first3)
    crowded = our_scores(matcher, m, e)["overall"][:, :3]
    # The published evaluation's scores of entities 0-2 depend on whether entities 3-5 share their block...
    assert (alone["overall"] - crowded).abs().max() > 1e-3
    # ...and ours follow the published equations in both blocks.
    torch.testing.assert_close(alone["overall"], reference_scores(P, m, first3, 2, compat=True)["overall"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(crowded, reference_scores(P, m, e, 2, compat=True)["overall"][:, :3], rtol=1e-4, atol=1e-4)


def test_default_model_scores_do_not_depend_on_the_block():
    matcher = small_matcher(2, seed=6)
    m, e = raw_inputs(2, 7), raw_inputs(6, 8)
    alone = our_scores(matcher, m, {key: v[:3] for key, v in e.items()})["overall"]
    crowded = our_scores(matcher, m, e)["overall"][:, :3]
    torch.testing.assert_close(alone, crowded, rtol=1e-5, atol=1e-5)
    one_mention = our_scores(matcher, {key: v[:1] for key, v in m.items()}, e)["overall"]
    torch.testing.assert_close(one_mention, our_scores(matcher, m, e)["overall"][:1], rtol=1e-5, atol=1e-5)


def synthetic_published_state(top_k_unused: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A published-style matcher state dict at the paper's sizes, built from the names and shapes
    of the published code alone (random values; nn.Linear weights as [out, in])."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name, d_in, d_out):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (d_out, d_in), (d_out,)

    def norm(name, d):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (d,), (d,)

    for name, d in (("text_cls_layernorm", 512), ("text_tokens_layernorm", 512), ("image_cls_layernorm", 96),
                    ("image_tokens_layernorm", 96)):
        norm(name, d)
    for unit, d_in, d_out in (("text_module", 512, 96), ("vision_module", 96, 96), ("cross_module", 96, 96)):
        lin(f"{unit}.moe_layer.gate.w_gate", d_in, 4)
        for ex in range(4):
            lin(f"{unit}.moe_layer.experts.{ex}.ff.0.0", d_in, 4 * d_in)
            lin(f"{unit}.moe_layer.experts.{ex}.ff.2", 4 * d_in, d_out)
    for unit in ("text_module", "vision_module"):
        for layer in ("fc_query", "fc_key", "fc_value"):
            lin(f"{unit}.{layer}", 96, 96)
        norm(f"{unit}.layer_norm", 96)
    lin("cross_module.text_fc", 512, 96)
    lin("cross_module.image_fc", 96, 96)
    lin("cross_module.gate_fc", 96, 1)
    norm("cross_module.gate_layer_norm", 96)
    norm("cross_module.context_layer_norm", 96)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("prefix", ["matcher.", ""])
@pytest.mark.parametrize("compat", [True, False])
def test_published_state_dict_round_trips_exactly(prefix, compat):
    state = synthetic_published_state(seed=1)
    matcher = published_matcher(top_k=3, compat=compat)
    dropped = load_published_matcher(matcher, {prefix + k: v for k, v in state.items()} | {"encoder.x.weight": torch.ones(1)})
    assert dropped == ["cross_module.context_layer_norm.weight", "cross_module.context_layer_norm.bias"]
    back = ours_to_published(matcher)
    assert set(back) == set(state) - set(dropped)
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    # Spot checks of the layout, independent of ours_to_published.
    own = matcher.state_dict()
    assert torch.equal(own["units.text.moe.w1"][2], state["text_module.moe_layer.experts.2.ff.0.0.weight"].t())
    assert torch.equal(own["units.cross.gate_norm.bias"], state["cross_module.gate_layer_norm.bias"])
    assert torch.equal(own["text_global_norm.weight"], state["text_cls_layernorm.weight"])


def test_published_state_dict_with_wrong_shapes_or_names_is_refused():
    state = synthetic_published_state(seed=2)
    with pytest.raises(ValueError, match="other shapes"):
        load_published_matcher(published_matcher(top_k=3), {**state, "text_module.fc_key.weight": torch.zeros(96, 95)})
    with pytest.raises(ValueError, match="missing"):
        load_published_matcher(published_matcher(top_k=3), {k: v for k, v in state.items() if "fc_value" not in k})
    with pytest.raises(ValueError, match="unknown published matcher key"):
        load_published_matcher(published_matcher(top_k=3), {**state, "text_module.extra.weight": torch.zeros(1)})
