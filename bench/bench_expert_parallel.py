"""Expert parallelism: training throughput and peak memory of the matcher as the expert count grows.

    python -m bench.bench_expert_parallel [--experts 4 16 64] [--batch 16] [--steps 6] [--top-k 2]

For every expert count (per switch layer; the matcher has 4 switch layers: text, vision, cross x2)
it trains the MMoE matcher (paper widths: text 512, image 96, hidden 96, experts 96 -> 96 -> 96,
top-k 2, 50 text and 50 image tokens; random CLIP-like features, no encoder) for a few steps with
DeepSpeed (fp32, ZeRO 0, AdamW) on 2 processes (torchrun, gloo), in three set-ups:

  local     the local backend (``SwitchMoE``, stacked experts, two batched matmuls per layer),
            data parallel: every rank holds every expert
  ds-ep1    the DeepSpeed backend (``deepspeed.moe.layer.MoE``), ep_size 1: data parallel too
  ds-ep2    the DeepSpeed backend, ep_size 2: each rank holds half of the experts, tokens travel
            by all-to-all

Each set-up runs in its own pair of processes, so the peak resident memory (``ru_maxrss``, the
largest of the two ranks, including the ~0.5 GB of torch/DeepSpeed/transformers) is its own. Also
printed: the expert parameters plus their gradients and Adam state held by one rank (analytic).
Throughput is samples/s per process (mentions; each also encodes its gold entity) from the median
step time. Ratios: each set-up
against itself at the smallest expert count, and against ``local`` at the same count. On CPU the
all-to-all goes through gloo and the processes share 2 cores, so this measures overheads, not the
memory relief expert parallelism gives on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = (("local", "local", 1), ("ds-ep1", "deepspeed", 1), ("ds-ep2", "deepspeed", 2))
TOKENS = 50


def worker(a: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from model import distributed as D
    from model.config import Config
    from moe.expert_parallel import setup_expert_parallel
    from moe.features import Features
    from moe.matcher import MatcherSettings, MMoEMatcher
    from moe.units import MoESettings
    from train.build import deepspeed_config
    from train.loss import contrastive_loss
    from train.optim_groups import param_groups

    D.init_process_group(use_deepspeed=True)
    torch.set_num_threads(1)
    rank, world = D.rank(), D.world()
    import deepspeed

    cfg = Config()
    cfg.model.matcher = MatcherSettings(moe=MoESettings(num_experts=a.num_experts, top_k=a.top_k,
                                                        backend=a.backend, ep_size=a.ep_size))
    cfg.data.batch_size, cfg.train.lr = a.batch, 1e-4

    class Bench(nn.Module):  # the matcher plus the loss, as one engine module
        def __init__(self) -> None:
            super().__init__()
            self.matcher = MMoEMatcher(cfg.model.matcher)

        def forward(self, m: Features, e: Features) -> torch.Tensor:
            ms, mlog = self.matcher.mention_side(m)
            es, elog = self.matcher.entity_side(e)
            mlog.merge(elog)
            gold = torch.arange(len(m))
            return contrastive_loss(self.matcher.score(ms, es), gold, gold, cfg.loss, mlog)[0]

    torch.manual_seed(0)
    model = Bench()
    setup_expert_parallel(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, eps=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, "fp32"))

    def features(seed: int) -> Features:
        g = torch.Generator().manual_seed(seed)
        b = a.batch
        return Features(torch.randn(b, 512, generator=g), torch.randn(b, TOKENS, 512, generator=g),
                        torch.ones(b, TOKENS, dtype=torch.bool), torch.randn(b, 96, generator=g),
                        torch.randn(b, TOKENS, 96, generator=g), torch.ones(b, dtype=torch.bool))

    batches = [(features(1000 * s + 2 * rank), features(1000 * s + 2 * rank + 1)) for s in range(a.warmup + a.steps)]
    times = []
    for m, e in batches:
        D.barrier()
        t0 = time.perf_counter()
        loss = engine(m, e)
        engine.backward(loss)
        engine.step()
        D.barrier()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[a.warmup:])[(a.steps - 1) // 2]  # median: robust to other load on the machine
    expert_numel = sum(p.numel() for n, p in engine.module.named_parameters()
                       if "deepspeed_experts" in n or n.endswith((".w1", ".w2", ".b1", ".b2")))
    rss = D.gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if rank == 0:
        Path(a.out).write_text(json.dumps({
            "samples_per_s_per_process": a.batch / step_s, "step_s": step_s, "world": world,
            "peak_rss_mb": max(rss), "expert_state_mb": expert_numel * 4 * 4 / 2**20,  # param, grad, Adam m and v
        }))
    D.barrier()
    torch.distributed.destroy_process_group()


def run_setup(num_experts: int, backend: str, ep_size: int, a: argparse.Namespace, port: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "bench.bench_expert_parallel", "--worker", "--num-experts", str(num_experts), "--backend", backend,
               "--ep-size", str(ep_size), "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--top-k", str(a.top_k), "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for attempt in (1, 2):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode == 0:
                return json.loads(out.read_text())
            # Rarely a rank aborts while the processes start or end ("terminate called without an
            # active exception", gloo); the measurement is redone once, and said so.
            lines = proc.stderr.strip().splitlines() or ["no message"]
            why = next((line for line in lines if "terminate" in line or "Error" in line), lines[-1])
            print(f"  ({backend} ep_size={ep_size} E={num_experts}: attempt {attempt} failed: {why.strip()})", flush=True)
            cmd[cmd.index("--master_port") + 1] = str(port + 1000)
        raise RuntimeError(f"{backend} ep_size={ep_size} E={num_experts} failed:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--batch", type=int, default=16, help="mentions per process per step")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-experts", type=int, help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--ep-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return
    t0 = time.perf_counter()
    results: dict[tuple[int, str], dict] = {}
    port = 29700
    for e in a.experts:
        for name, backend, ep in SETUPS:
            port += 1
            results[e, name] = r = run_setup(e, backend, ep, a, port)
            print(f"  E={e:3d} {name:7s} {r['samples_per_s_per_process']:7.1f} samples/s/process  "
                  f"step {r['step_s'] * 1000:6.0f} ms  peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
    base_e = a.experts[0]
    print(f"\nmatcher training, 2 processes (gloo, 1 thread each), batch {a.batch}/process, top-{a.top_k}, "
          f"median of {a.steps} steps after {a.warmup}; {time.perf_counter() - t0:.0f}s in all\n")
    print("| experts/layer | set-up | samples/s/process | step ms | vs same set-up at "
          f"E={base_e} | vs local | peak RSS MB | expert state MB/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for e in a.experts:
        for name, _, _ in SETUPS:
            r = results[e, name]
            sps = r["samples_per_s_per_process"]
            vs_small = sps / results[base_e, name]["samples_per_s_per_process"]
            vs_local = sps / results[e, "local"]["samples_per_s_per_process"]
            print(f"| {e} | {name} | {sps:.1f} | {r['step_s'] * 1000:.0f} | {vs_small:.2f} | {vs_local:.2f} "
                  f"| {r['peak_rss_mb']:.0f} | {r['expert_state_mb']:.1f} |")


if __name__ == "__main__":
    main()
