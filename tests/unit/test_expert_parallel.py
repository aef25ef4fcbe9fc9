"""The DeepSpeed-MoE backend (model.matcher.moe.backend: deepspeed) and expert parallelism (CPU, gloo).

Parity with the local layer at ep_size 1 (one process) and 2 (two processes, tests/support/ep_parity_worker.py),
ZeRO 0/1/2 training equal to local data-parallel training, a 2-process ep_size 2 training run with
kill and exact resume, the export in the local layout, checkpoint conversion and one-process evaluation.
"""

import pytest
import torch

from model.config import ConfigError, load_config
from moe.deepspeed_backend import DeepSpeedSwitchMoE
from moe.layer_spec import LayerSpec
from moe.switch import SwitchMoE
from moe.units import MoESettings
from tests.support.runs import TINY


def test_weights_convert_between_layouts_in_both_directions():
    torch.manual_seed(0)
    local = SwitchMoE(LayerSpec(8, 16, 4, 2, gate_dim=5))
    torch.manual_seed(0)
    ds = DeepSpeedSwitchMoE(LayerSpec(8, 16, 4, 2, gate_dim=5))  # same seed: same initial weights as the local layer
    x, g = torch.randn(2, 7, 8), torch.randn(2, 7, 5)
    torch.testing.assert_close(ds(x, g).output, local(x, g).output)
    # Documented mapping: deepspeed_experts.{i}.fc1.weight = w1[e].T with e = ep_rank * L + i.
    torch.testing.assert_close(ds.deepspeed_moe.experts.deepspeed_experts[3].fc1.weight, local.w1[3].t())
    other = SwitchMoE(LayerSpec(8, 16, 4, 2, gate_dim=5))
    other.load_state_dict(ds.state_dict())  # DeepSpeed layout with every expert -> local layout
    torch.testing.assert_close(other(x, g).output, local(x, g).output)
    half = DeepSpeedSwitchMoE(LayerSpec(8, 16, 4, 2, gate_dim=5), ep_size=2)  # ep rank 1 of 2 holds experts 2 and 3
    half.load_local_state(local.state_dict(), ep_rank=1)
    torch.testing.assert_close(half.deepspeed_moe.experts.deepspeed_experts[0].fc2.weight, local.w2[2].t())
    assert half.num_local_experts == 2
    with pytest.raises(ValueError, match="one rank of an expert-parallel model"):
        SwitchMoE(LayerSpec(8, 16, 4, 2, gate_dim=5)).load_state_dict(half.state_dict())


@pytest.mark.parametrize("dropped", ["zero", "passthrough"])
def test_dropped_tokens_match_the_local_layer(dropped):
    kw = dict(capacity_factor=0.25, min_capacity=1, drop_tokens=True, dropped=dropped)
    torch.manual_seed(1)
    local = SwitchMoE(LayerSpec(8, 16, 4, 2, **kw))
    torch.manual_seed(1)
    ds = DeepSpeedSwitchMoE(LayerSpec(8, 16, 4, 2, **kw))
    x = torch.randn(3, 20, 8)
    a, b = local(x), ds(x)
    assert a.dropped_tokens > 0 and torch.equal(a.dropped_tokens, b.dropped_tokens)
    torch.testing.assert_close(b.output, a.output)


def test_settings_are_checked_and_an_expert_parallel_layer_refuses_uneven_evaluation():
    for overrides, message in ((["model.matcher.moe.backend=deepspeed", "model.matcher.moe.ep_size=3"], "divide num_experts"),
                               (["model.matcher.moe.ep_size=2"], "needs backend: deepspeed"),
                               (["model.matcher.moe.backend=deepspeed", "model.matcher.compat=published"], "local backend")):
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, overrides)
    layer = MoESettings(num_experts=4, top_k=2, backend="deepspeed", ep_size=2).build(8, 8)
    layer.eval()
    with pytest.raises(RuntimeError, match="local_experts"):  # would hang: ranks encode different batches
        layer(torch.randn(2, 5, 8))
