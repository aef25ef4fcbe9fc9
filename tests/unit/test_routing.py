"""The switch gate: DeepSpeed parity, top-k semantics, capacity, and the published gate."""

import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

from moe.layer_spec import LayerSpec
from moe.routing import published_gate, switch_route
from moe.switch import SwitchMoE


def dense_weights(routing, num_experts):
    """[T, E] combine weights from our sparse routing."""
    w = torch.zeros(routing.expert_index.shape[0], num_experts)
    return w.scatter_add(1, routing.expert_index, routing.weight)


def deepspeed_gate(logits, k, capacity_factor, min_capacity, drop_tokens):
    if k == 1:
        out = top1gating(logits.clone(), capacity_factor, min_capacity, drop_tokens=drop_tokens, use_rts=False)
    elif k == 2:
        out = top2gating(logits.clone(), capacity_factor, min_capacity, drop_tokens=drop_tokens,
                         top2_2nd_expert_sampling=False)
    else:
        out = topkgating(logits.clone(), k, capacity_factor, min_capacity, drop_tokens=drop_tokens)
    l_aux, combine, _, counts = out
    return l_aux, combine.sum(-1), counts


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("drop", [False, True])
def test_routing_matches_deepspeed_topkgate(k, drop):
    torch.manual_seed(k)
    num_experts, tokens = 4, 40
    logits = torch.randn(tokens, num_experts) * 2
    # Skew the router so that capacity 0.5 really drops tokens.
    logits[:, 0] += 1.5
    ds_aux, ds_weights, ds_counts = deepspeed_gate(logits, k, 0.5, 2, drop)
    ours = switch_route(logits, k, capacity_factor=0.5, min_capacity=2, drop_tokens=drop)
    if drop and k == 1:
        # DeepSpeed picks which top-1 routes survive with topk over a 0/1 mask (tie order is
        # unspecified); we keep the earliest tokens. The kept count per expert must agree.
        assert torch.equal((ds_weights > 0).sum(0), (dense_weights(ours, num_experts) > 0).sum(0))
    else:
        torch.testing.assert_close(dense_weights(ours, num_experts), ds_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.l_aux, ds_aux)
    assert torch.equal(ours.expert_counts, ds_counts)
    if drop:
        assert (~ours.kept).any(), "the skewed router should overflow expert 0"


def expert_mixture(moe, x, weights):
    """Naive reference: every expert on every token, one Python loop, weighted by [T, E]."""
    outs = torch.stack([moe.expert_forward(e, x) for e in range(moe.num_experts)], dim=1)  # [T, E, d]
    return (outs * weights.unsqueeze(-1)).sum(1)


def test_top_k_equal_to_num_experts_is_dense_softmax_mixture():
    torch.manual_seed(0)
    moe = SwitchMoE(LayerSpec(8, 16, num_experts=4, top_k=4))
    x = torch.randn(30, 8)
    out = moe(x).output
    probs = F.softmax(moe.router_logits(x), dim=-1)
    torch.testing.assert_close(out, expert_mixture(moe, x, probs), rtol=1e-5, atol=1e-6)


def test_top1_routes_each_token_to_exactly_one_expert():
    torch.manual_seed(1)
    moe = SwitchMoE(LayerSpec(8, 16, num_experts=4, top_k=1))
    x = torch.randn(30, 8)
    routing = switch_route(moe.router_logits(x), 1)
    assert routing.expert_index.shape == (30, 1)
    probs = F.softmax(moe.router_logits(x), dim=-1)
    chosen = probs.argmax(-1)
    assert torch.equal(routing.expert_index[:, 0], chosen)
    one_hot = F.one_hot(chosen, 4).float() * probs  # Switch: weight = router probability
    torch.testing.assert_close(moe(x).output, expert_mixture(moe, x, one_hot), rtol=1e-5, atol=1e-6)
    # Changing an expert the token was not routed to leaves its output unchanged.
    before = moe(x).output
    with torch.no_grad():
        unused = [e for e in range(4) if e != chosen[0]][0]
        moe.w2[unused] += 1.0
    after = moe(x).output
    torch.testing.assert_close(after[0], before[0])


def test_top2_renormalises_over_kept_experts_and_matches_loop():
    torch.manual_seed(2)
    moe = SwitchMoE(LayerSpec(8, 16, num_experts=4, top_k=2))
    x = torch.randn(50, 8)
    probs = F.softmax(moe.router_logits(x), dim=-1)
    top_p, top_i = probs.topk(2, dim=-1)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_p / top_p.sum(-1, keepdim=True))
    torch.testing.assert_close(moe(x).output, expert_mixture(moe, x, weights), rtol=1e-5, atol=1e-6)


def test_capacity_drops_tokens_zero_or_passthrough():
    torch.manual_seed(3)
    x = torch.randn(64, 8)
    zero = SwitchMoE(LayerSpec(8, 16, num_experts=4, top_k=1, capacity_factor=0.25, min_capacity=1, drop_tokens=True))
    with torch.no_grad():
        zero.wg.weight.zero_()
        zero.wg.weight[0] = 5.0 * x.mean(0).sign()  # most tokens want expert 0
    routing = switch_route(zero.router_logits(x), 1, capacity_factor=0.25, min_capacity=1, drop_tokens=True)
    capacity = 4  # ceil(64 / 4 * 0.25)
    kept_per_expert = torch.bincount(routing.expert_index[routing.kept], minlength=4)
    assert kept_per_expert.max().item() <= capacity
    lost = ~routing.kept[:, 0]
    assert lost.sum() > 0
    out = zero(x).output
    assert torch.all(out[lost] == 0)
    passthrough = SwitchMoE(LayerSpec(8, 16, num_experts=4, top_k=1, capacity_factor=0.25, min_capacity=1,
                                      drop_tokens=True, dropped="passthrough"))
    passthrough.load_state_dict(zero.state_dict())
    out_p = passthrough(x).output
    torch.testing.assert_close(out_p[lost], x[lost])
    torch.testing.assert_close(out_p[~lost], out[~lost])


def test_gate_can_read_a_different_tensor():
    torch.manual_seed(4)
    moe = SwitchMoE(LayerSpec(8, 16, num_experts=4, top_k=2, gate_dim=5))
    x, g = torch.randn(10, 8), torch.randn(10, 5)
    out = moe(x, g).output
    probs = F.softmax(g @ moe.wg.weight.t() + moe.wg.bias, dim=-1)
    top_p, top_i = probs.topk(2, dim=-1)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_p / top_p.sum(-1, keepdim=True))
    torch.testing.assert_close(out, expert_mixture(moe, x, weights), rtol=1e-5, atol=1e-6)


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    routing = switch_route(logits, 1)
    expected = ((torch.log(torch.tensor(2.0))) ** 2 + torch.logsumexp(torch.tensor([1.0, 3.0]), 0) ** 2) / 2
    torch.testing.assert_close(routing.z_loss, expected)


def test_published_gate_matches_hand_computed_example():
    # Batch N=2, sequence L=3, E=2 experts, top-1. Logits chosen so that the softmax values are
    # exact: logit 0 vs log(3) gives probabilities 1/4 and 3/4.
    l3 = torch.log(torch.tensor(3.0)).item()
    logits = torch.tensor([
        [[0.0, l3], [l3, 0.0], [0.0, l3]],   # sample 0: top experts 1, 0, 1
        [[l3, 0.0], [l3, 0.0], [0.0, l3]],   # sample 1: top experts 0, 0, 1
    ])
    # scatter_(1, idx, 1): for sample n, token l with top expert i, set mask[n, i, 0] = 1 (column 0
    # because k=1). Sample 0 marks positions {1, 0, 1} -> rows 0 and 1 in column 0; sample 1 marks
    # {0, 0, 1} -> rows 0 and 1 in column 0. Column 1 and row 2 stay zero.
    # g = p * mask: sample 0 rows 0,1 col 0 = p[0,0,0]=1/4, p[0,1,0]=3/4; sample 1: 3/4, 3/4.
    # Normalise over the batch (dim 0) per (row, col), + 1e-6 in the denominator, and multiply by N=2:
    #   (row 0, col 0): 1/4 / (1/4 + 3/4) * 2 = 0.5 for sample 0, 1.5 for sample 1
    #   (row 1, col 0): 3/4 / (3/4 + 3/4) * 2 = 1.0 for both samples
    expected = torch.tensor([
        [[0.5, 0.0], [1.0, 0.0], [0.0, 0.0]],
        [[1.5, 0.0], [1.0, 0.0], [0.0, 0.0]],
    ])
    torch.testing.assert_close(published_gate(logits, 1), expected)
    # The empty (row 2) columns stay exactly zero: 0 / (0 + 1e-6).
    assert torch.all(published_gate(logits, 1)[:, 2] == 0)


def test_published_gate_zeroes_late_positions_and_uses_first_k_experts():
    torch.manual_seed(5)
    weights = published_gate(torch.randn(3, 10, 4), 2)
    assert torch.all(weights[:, 4:] == 0)  # positions >= E get nothing
    assert torch.all(weights[..., 2:] == 0)  # experts >= k are never used


def test_experts_can_change_width_like_the_published_text_unit():
    """d -> 4d -> out with out != d (the text unit: 512 -> 2048 -> 96), checked against a loop."""
    torch.manual_seed(6)
    moe = SwitchMoE(LayerSpec(12, 48, num_experts=4, top_k=3, d_out=5))
    x = torch.randn(2, 9, 12)
    out = moe(x).output
    assert out.shape == (2, 9, 5)
    flat = x.reshape(-1, 12)
    probs = F.softmax(moe.router_logits(flat), dim=-1)
    top_p, top_i = probs.topk(3, dim=-1)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_p / top_p.sum(-1, keepdim=True))
    torch.testing.assert_close(out.reshape(-1, 5), expert_mixture(moe, flat, weights), rtol=1e-5, atol=1e-6)


def test_published_layer_is_the_dense_mixture_under_the_published_gate():
    torch.manual_seed(7)
    moe = SwitchMoE(LayerSpec(6, 24, num_experts=4, top_k=2, d_out=3, gate="published"))
    x = torch.randn(5, 8, 6)
    weights = published_gate(moe.router_logits(x), 2)  # [N, L, E]
    expected = torch.stack([expert_mixture(moe, x[n], weights[n]) for n in range(5)])
    torch.testing.assert_close(moe(x).output, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(moe(x).output[:, 4:] == 0)
