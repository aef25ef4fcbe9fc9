"""Worker of tests/integration/test_expert_parallel.py: the DeepSpeed MoE backend against the local layer.

    python tests/support/ep_parity_worker.py OUT.json                             # one process: ep_size 1
    torchrun --nproc_per_node 2 tests/support/ep_parity_worker.py OUT.json        # two: ep_size 1 and 2, ZeRO 0/1/2

Every rank feeds its own inputs (of a different size) to a DeepSpeed-backend layer and to a local
``SwitchMoE`` built from the same seed (so with the same weights), and records the largest
differences of outputs, losses, counts and gradients. An expert's gradient in an expert-parallel
layer sums every rank's tokens (they reach it by all-to-all), so it is compared with the local
gradients summed over the ranks. Rank 0 writes ``{"world": W, "ranks": [per-rank results]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import distributed as D  # noqa: E402
from model.config import Config  # noqa: E402
from model.mmoe import MMoEModel  # noqa: E402
from moe.deepspeed_backend import DeepSpeedSwitchMoE
from moe.expert_parallel import (  # noqa: E402
    local_experts,
    local_state_dict,
    setup_expert_parallel,  # noqa: E402
)
from moe.layer_spec import LayerSpec  # noqa: E402
from moe.switch import SwitchMoE  # noqa: E402
from tests.support.helpers import random_batch, tiny_model_config  # noqa: E402
from train.loss import contrastive_loss  # noqa: E402


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0


def expert_grads(layer) -> dict[str, torch.Tensor]:
    """Expert gradients in the local layout (a DeepSpeed layer: its local experts only)."""
    if isinstance(layer, SwitchMoE):
        return {n: getattr(layer, n).grad for n in ("w1", "b1", "w2", "b2")}
    ex = layer.deepspeed_moe.experts.deepspeed_experts
    return {"w1": torch.stack([e.fc1.weight.grad.t() for e in ex]), "b1": torch.stack([e.fc1.bias.grad for e in ex]),
            "w2": torch.stack([e.fc2.weight.grad.t() for e in ex]), "b2": torch.stack([e.fc2.bias.grad for e in ex])}


def layer_parity(ep: int, k: int, drop: bool, gate_dim: int | None, rank: int, d_in: int = 8,
                 d_out: int = 8) -> dict[str, float]:
    """One switch layer ``d_in -> 4 d_in -> d_out``; d_out != d_in is the published text unit's shape (512 -> 96)."""
    kw = dict(d_out=d_out, gate_dim=gate_dim, capacity_factor=8.0 if drop else 1.0,
              eval_capacity_factor=8.0 if drop else 1.0, min_capacity=1, drop_tokens=drop)
    spec = LayerSpec(d_in, 4 * d_in, 4, k, **kw)
    torch.manual_seed(10 + k)
    local = SwitchMoE(spec)
    torch.manual_seed(10 + k)
    ds = DeepSpeedSwitchMoE(spec, ep_size=ep)
    setup_expert_parallel(ds)
    g = torch.Generator().manual_seed(1000 * rank + 7 * k)
    n = 3 + rank  # ranks route different token counts
    x = torch.randn(n, 10, d_in, generator=g)
    gin = torch.randn(n, 10, gate_dim, generator=g) if gate_dim else None
    w = torch.randn(n, 10, d_out, generator=g)
    res: dict[str, float] = {}
    grads = {}
    for name, layer in (("local", local), ("ds", ds)):
        xi = x.clone().requires_grad_()
        gi = gin.clone().requires_grad_() if gin is not None else None
        out = layer(xi, gi)
        ((out.output * w).sum() + 0.3 * out.l_aux + 0.1 * out.z_loss).backward()
        grads[name] = (out, xi.grad, gi.grad if gi is not None else None, layer)
    (lo, lx, lg, _), (do, dx, dg, _) = grads["local"], grads["ds"]
    res["output"] = diff(lo.output, do.output)
    res["l_aux"] = diff(lo.l_aux, do.l_aux)
    res["z_loss"] = diff(lo.z_loss, do.z_loss)
    res["counts"] = diff(lo.expert_counts, do.expert_counts)
    res["dropped"] = diff(lo.dropped_tokens, do.dropped_tokens)
    res["grad_x"] = diff(lx, dx)
    if lg is not None:
        res["grad_gate_input"] = diff(lg, dg)
    res["grad_router"] = diff(local.wg.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad)
    res["grad_router_bias"] = diff(local.wg.bias.grad, ds.deepspeed_moe.gate.wg.bias.grad)
    ref = expert_grads(local)
    if ep > 1:  # expert e's gradient gathers every rank's tokens
        for t in ref.values():
            dist.all_reduce(t, group=ds.ep_group)
    mine = ds.local_expert_ids()
    for key, t in expert_grads(ds).items():
        res[f"grad_{key}"] = diff(ref[key][mine.start:mine.stop], t)
    # The gathered experts are the local layer's weights; to_local() gives the same outputs.
    full = ds.gathered_local_state()
    res["gathered_weights"] = max(diff(full[key], local.state_dict()[key]) for key in full)
    # Eval mode (eval_capacity_factor) in lockstep, and through the local copy.
    local.eval()
    ds.eval()
    ds.lockstep_eval = True
    with torch.no_grad():
        res["eval_output"] = diff(local(x, gin).output, ds(x, gin).output)
        res["to_local_output"] = diff(local(x, gin).output, ds.to_local()(x, gin).output)
    return res


def model_parity(ep: int, rank: int) -> dict[str, float]:
    """The whole tiny MMoE model (text, vision and cross units) in both backends, same seed."""
    torch.manual_seed(0)
    local = MMoEModel(tiny_model_config())
    torch.manual_seed(0)
    ds = MMoEModel(tiny_model_config(backend="deepspeed", ep_size=ep))
    setup_expert_parallel(ds)
    m, e = random_batch(4, seed=50 + rank, missing=(1,)), random_batch(4, seed=60 + rank)
    gold = torch.arange(4)
    res = {}
    outs = {}
    for name, model in (("local", local), ("ds", ds)):
        scores, log = model(m, e)
        loss, _ = contrastive_loss(scores, gold, gold, Config().loss, log)
        loss.backward()
        outs[name] = (scores, log, loss)
    (ls, ll, lloss), (dsc, dl, dloss) = outs["local"], outs["ds"]
    res["scores"] = max(diff(ls[h], dsc[h]) for h in ls)
    res["loss"] = diff(lloss, dloss)
    res["counts"] = max(diff(ll.load[n][0], dl.load[n][0]) for n in ll.load)
    dense = {n: p.grad for n, p in ds.named_parameters() if "deepspeed_moe" not in n}
    res["grad_dense"] = max(diff(p.grad, dense[n]) for n, p in local.named_parameters()
                            if ".moe" not in n and ".moe_" not in n and p.grad is not None)
    res["local_state_dict"] = max(diff(v, local.state_dict()[k]) for k, v in local_state_dict(ds).items())
    ds.eval()
    local.eval()
    with torch.no_grad(), local_experts(ds) as swapped:
        side, _ = swapped.mention_side(m)
        ref, _ = local.mention_side(m)
        res["local_experts_side"] = max(diff(side[k], ref[k]) for k in ref.tensors)
    res["restored"] = float(sum(isinstance(x, DeepSpeedSwitchMoE) for x in ds.modules()) != 3)  # text, vision, cross
    return res


def train_runs(world: int, rank: int) -> dict[str, float]:
    """3 optimizer steps, local backend (data parallel) vs DeepSpeed ep_size 2 with ZeRO 0, 1, 2."""
    import deepspeed

    from train.build import deepspeed_config
    from train.optim_groups import param_groups

    res: dict[str, float] = {}
    finals = {}
    for name, backend, ep, stage in (("local", "local", 1, 0), ("ep2_zero0", "deepspeed", 2, 0),
                                     ("ep2_zero1", "deepspeed", 2, 1), ("ep2_zero2", "deepspeed", 2, 2)):
        cfg = Config()
        cfg.model = tiny_model_config(backend=backend, ep_size=ep)
        cfg.data.batch_size = 4
        cfg.train.zero_stage, cfg.train.grad_clip, cfg.train.lr, cfg.train.clip_lr = stage, 0.0, 1e-3, 5e-4
        torch.manual_seed(0)
        model = MMoEModel(cfg.model)
        setup_expert_parallel(model)  # before deepspeed.initialize, which accepts layers already set up
        start = local_state_dict(model)
        groups = param_groups(model, cfg)
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, "fp32"))
        for step in range(3):
            m, e = random_batch(4, seed=100 * step + rank), random_batch(4, seed=100 * step + rank + 50)
            scores, log = engine(m, e)
            loss, _ = contrastive_loss(scores, torch.arange(4), torch.arange(4), cfg.loss, log)
            engine.backward(loss)
            engine.step()
        finals[name] = local_state_dict(engine.module)
        res[f"{name}/moved"] = min(diff(finals[name][k], start[k]) for k in start if k.endswith((".w1", ".wg.weight")))
        res[f"{name}/groups"] = float(len(groups))
        res[f"{name}/lrs"] = [g["lr"] for g in engine.optimizer.param_groups]
        res[f"{name}/moe_groups"] = float(sum(bool(g.get("moe")) for g in groups))
        if backend == "deepspeed":
            own = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
            other = D.gather_objects(own)
            peer = other[1 - rank]
            res[f"{name}/dense_rank_diff"] = max(diff(v, peer[k]) for k, v in own.items() if "deepspeed_experts" not in k)
            res[f"{name}/expert_rank_diff"] = min(diff(v, peer[k]) for k, v in own.items() if "deepspeed_experts" in k)
    for name in finals:
        if name != "local":
            res[f"{name}/vs_local"] = max(diff(v, finals["local"][k]) for k, v in finals[name].items())
    return res


def main() -> None:
    out = Path(sys.argv[1])
    D.init_process_group(use_deepspeed=True)
    world, rank = D.world(), D.rank()
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    for ep in (1, 2) if world == 2 else (1,):
        for k in (1, 2, 3):
            for drop in (False, True):
                for gate_dim in (None, 5):
                    for key, v in layer_parity(ep, k, drop, gate_dim, rank).items():
                        results[f"layer/ep{ep}/k{k}/drop{int(drop)}/gate{gate_dim or 0}/{key}"] = v
                for key, v in layer_parity(ep, k, drop, None, rank, d_in=12, d_out=5).items():  # width change
                    results[f"layer/ep{ep}/k{k}/drop{int(drop)}/12to5/{key}"] = v
        for key, v in model_parity(ep, rank).items():
            results[f"model/ep{ep}/{key}"] = v
    if world == 2:
        results.update({f"train/{k}": v for k, v in train_runs(world, rank).items()})
    gathered = D.gather_objects(results)
    if rank == 0:
        out.write_text(json.dumps({"world": world, "ranks": gathered}, indent=1))
    D.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
