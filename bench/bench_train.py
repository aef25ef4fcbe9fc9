"""The whole training step at the paper's sizes: ours through DeepSpeed vs the published step written plainly.

    python -m bench.bench_train [--batch 32] [--iters 3] [--device cpu|cuda] [--bf16] [--json FILE]

Sizes (WikiMEL): a random-init ``CLIPModel`` with Hugging Face's default ``CLIPConfig`` (ViT-B/32 and its
12-layer text tower, 151M parameters, both fine-tuned; the speed does not depend on the weights), 224-pixel
images (90% of the rows have one), texts of 8-50 tokens padded to 50, batch 32 mentions x their 32 gold
entities, the paper-size matcher (dt 512, dv 96, hidden 96, 4 experts d -> 4d, top-k 3), AdamW at the
published settings (lr 5e-6, eps 1e-4, weight decay 1e-4 except biases).

* **ours**: the trainer's step (train/trainer.py ``_micro_step``): the model in a DeepSpeed engine built
  from the run config (``deepspeed_config``, ``param_groups``, ``GuardedAdamW``), the vision tower only on
  rows with an image, sparse top-k experts, ``contrastive_loss`` (every head, duplicate golds masked),
  ``engine.backward``, the fp32 gradient norm the trainer logs, ``engine.step`` (clipping, the guard).
* **published**: the same weights, written the straightforward way the published code trains: CLIP on every
  row (a missing image reads as zero pixels), every expert dense on every token weighted by the gate
  (bench/published_style.py), the cross-entropy of the overall and each unit's score summed,
  ``loss.backward()``, ``torch.optim.AdamW.step()``.

Each variant runs in its own process (its peak memory is its own), after one warm-up step; ``--rounds R``
runs the list R times interleaved and keeps each variant's fastest process (a shared machine's speed drifts
by 10-20% between processes). Printed: seconds per step (the median of ``--iters`` steps), samples/s, the
model FLOPs per step (forward counted by torch's FlopCounterMode from the ops' shapes, on our step, eager
attention; backward = 2x forward) as a fraction of the best matmul rate any process of the run measured
(square matmuls, ``train.phases.matmul_gflops``), peak memory, and the split of one extra step between CLIP,
the matcher, the loss, backward, our gradient norm and the optimizer step (synchronised timers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from bench.published_style import published_style_unit_scores
from model import distributed as D
from model.config import Config
from model.encoder import ClipEncoder
from model.mmoe import MMoEModel
from moe.expert_parallel import global_grad_norm
from moe.matcher import MatcherSettings
from moe.units import MoESettings
from train.build import ADAMW_KWARGS, deepspeed_config
from train.loss import contrastive_loss
from train.optim_groups import param_groups
from train.phases import count_flops, matmul_gflops
from train.step_guard import GuardedAdamW

TEXT_LEN = 50
IMAGE_SIZE = 224
PARTS = ("clip", "matcher", "loss", "backward", "grad_norm", "optimizer")
# Variants: the published step, our step, and our step with one measured option changed.
OPTIONS = {"published": {}, "ours": {}, "ours+eager": {"attn": "eager"}, "ours+loop": {"adamw": "loop"},
           "ours+foreach": {"adamw": "foreach"}, "ours+fused": {"adamw": "fused"}, "ours+ckpt": {"checkpointing": True},
           "ours+compile-encoder": {"compile": "encoder"}, "ours+compile-matcher": {"compile": "matcher"},
           "ours+compile": {"compile": "all"}}


def paper_config(batch: int, top_k: int = 3) -> Config:
    """The run config of a WikiMEL run at the paper's settings (CLIP itself comes from paper_model)."""
    cfg = Config()
    cfg.model.text_max_length = TEXT_LEN
    cfg.model.matcher = MatcherSettings(text_dim=512, image_dim=96, hidden=96, cross_dim=96,
                                        moe=MoESettings(num_experts=4, top_k=top_k, expert_mult=4))
    cfg.data.batch_size = batch
    cfg.train.lr = 5e-6
    return cfg


def paper_model(cfg: Config, seed: int = 0, attn: str = "sdpa") -> MMoEModel:
    """MMoEModel with a random-init ViT-B/32 CLIP (Hugging Face's default CLIPConfig) and the paper's matcher;
    ``attn``: CLIP's attention implementation (``sdpa``: torch's scaled_dot_product_attention; ``eager``)."""
    small = Config()
    small.model.matcher = cfg.model.matcher
    t = small.model.tiny_clip
    t.vocab_size, t.bos_token_id, t.eos_token_id, t.pad_token_id = 16, 0, 1, 2
    t.text_hidden = t.vision_hidden = t.projection_dim = 8
    t.layers, t.heads = 1, 1
    torch.manual_seed(seed)
    model = MMoEModel(small.model)  # the matcher (and a throw-away tiny CLIP) ...
    clip = CLIPModel._from_config(CLIPConfig(), attn_implementation=attn)  # ... then the real architecture
    model.encoder = ClipEncoder(clip, cfg.model.matcher.text_dim, cfg.model.matcher.image_dim)
    return model


def random_batch(n: int, seed: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, TEXT_LEN + 1, (n,), generator=g)
    mask = (torch.arange(TEXT_LEN)[None] < lengths[:, None]).long()
    ids = torch.randint(3, vocab - 2, (n, TEXT_LEN), generator=g) * mask
    ids[torch.arange(n), lengths - 1] = vocab - 1  # CLIP's eos closes each text
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
            "image_mask": torch.rand(n, generator=g) > 0.1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timers:
    """Seconds per part of one step (synchronised); off: no synchronisation, no cost."""

    def __init__(self, device: torch.device, on: bool) -> None:
        self.device, self.on, self.seconds = device, on, dict.fromkeys(PARTS, 0.0)

    def __call__(self, part: str):
        return self._time(part) if self.on else nullcontext()

    def _time(self, part: str):
        timers = self

        class _Block:
            def __enter__(self):
                _sync(timers.device)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                _sync(timers.device)
                timers.seconds[part] += time.perf_counter() - self.t

        return _Block()


def _forward(model: MMoEModel, m: dict, e: dict, timers: Timers, published: bool) -> dict[str, torch.Tensor]:
    with timers("clip"):
        fm, fe = model.features(m), model.features(e)
    with timers("matcher"):
        if published:
            return published_style_unit_scores(model.matcher, fm, fe)
        m_side, m_log = model.matcher.mention_side(fm)
        e_side, e_log = model.matcher.entity_side(fe)
        m_log.merge(e_log)
        return {**model.matcher.score(m_side, e_side), "_log": m_log}


class OurStep:
    """The trainer's micro-step (one micro-batch per optimizer step, one process)."""

    def __init__(self, cfg: Config, model: MMoEModel, device: torch.device, precision: str, adamw: str = "auto") -> None:
        import deepspeed

        self.cfg, self.device, self.precision = cfg, device, precision
        opt = GuardedAdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                           eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay, **ADAMW_KWARGS[adamw])
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, precision))
        self.gold = torch.arange(cfg.data.batch_size, device=device)
        self.weight = torch.ones(cfg.data.batch_size, device=device)

    def __call__(self, m: dict, e: dict, timers: Timers) -> torch.Tensor:
        if timers.on:  # the engine's forward is the module's: call the parts to time them
            scores = _forward(self.engine.module, m, e, timers, published=False)
            log = scores.pop("_log")
        else:
            scores, log = self.engine(m, e)
        with timers("loss"):
            loss, _ = contrastive_loss(scores, self.gold, self.gold, self.cfg.loss, log, row_weight=self.weight)
        with timers("backward"):
            self.engine.backward(loss)
        with timers("grad_norm"):
            if self.precision == "fp32":  # the norm the trainer logs for a plain fp32 optimizer
                global_grad_norm(self.engine.module, self.device, 1)
        with timers("optimizer"):  # DeepSpeed's clipping (its own norm), the guard's finiteness norm, AdamW
            self.engine.step()
        return loss.detach()


class PublishedStep:
    """The published training step, written plainly: dense experts, CLIP on every row, no engine."""

    def __init__(self, cfg: Config, model: MMoEModel, device: torch.device, precision: str) -> None:
        t = cfg.train
        decay = [p for n, p in model.named_parameters() if "bias" not in n]
        no_decay = [p for n, p in model.named_parameters() if "bias" in n]
        self.model = model
        model.encoder.zero_pixels_for_missing = True
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)  # torch's default, as published
        self.target = torch.arange(cfg.data.batch_size, device=device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())

    def __call__(self, m: dict, e: dict, timers: Timers) -> torch.Tensor:
        with self.autocast:
            scores = _forward(self.model, m, e, timers, published=True)
        with timers("loss"):
            loss = sum(F.cross_entropy(s.float(), self.target) for s in scores.values())
        with timers("backward"):
            loss.backward()
        with timers("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def model_flops(cfg: Config, m: dict, e: dict, device: torch.device) -> float:
    """FLOPs of one training step of our model: 3x the forward (counted from the ops' shapes; eager attention,
    whose matmuls the counter sees as such)."""
    model = paper_model(cfg, attn="eager").to(device)
    with torch.no_grad():
        _, flops = count_flops(lambda: model(m, e))
    return 3.0 * flops


def run_variant(variant: str, batch: int, iters: int, device: torch.device, bf16: bool) -> dict:
    D.init_process_group(use_deepspeed=True)
    precision = "bf16" if bf16 else "fp32"
    cfg = paper_config(batch)
    vocab = CLIPConfig().text_config.vocab_size
    m = {k: v.to(device) for k, v in random_batch(batch, 1, vocab).items()}
    e = {k: v.to(device) for k, v in random_batch(batch, 2, vocab).items()}
    rate = matmul_gflops(device, torch.bfloat16 if bf16 else torch.float32, n=8192 if device.type == "cuda" else 2048)
    flops = model_flops(cfg, m, e, device)
    opts = OPTIONS[variant]
    model = paper_model(cfg, attn=opts.get("attn", "sdpa")).to(device)
    if opts.get("checkpointing"):  # train.activation_checkpointing
        model.encoder.enable_activation_checkpointing()
    model.compile_parts(opts.get("compile", "none"))  # train.compile
    step = (PublishedStep(cfg, model, device, precision) if variant == "published"
            else OurStep(cfg, model, device, precision, opts.get("adamw", "auto")))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    off = Timers(device, on=False)
    times = []
    for i in range(iters + 1):
        _sync(device)
        t0 = time.perf_counter()
        loss = step(m, e, off)
        _sync(device)
        if i == 0:  # the first step is warm-up (allocations, kernel choice, optimizer state, torch.compile)
            first_step, first_loss = time.perf_counter() - t0, float(loss)
        else:
            times.append(time.perf_counter() - t0)
    split = Timers(device, on=True)
    step(m, e, split)
    s = statistics.median(times)
    out = {"variant": variant, "device": device.type, "precision": precision, "batch": batch, "iters": iters,
           "threads": torch.get_num_threads(), "seconds_per_step": s, "samples_per_s": batch / s,
           "step_flops": flops, "matmul_gflops": rate, "matmul_fraction": flops / s / 1e9 / rate,
           "split_s": split.seconds, "first_step_s": first_step, "first_loss": first_loss}
    if device.type == "cuda":
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # ru_maxrss is KiB on Linux: the process's peak, and its growth during the steps
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_mem_mib"], out["peak_growth_mib"] = peak / 1024, (peak - rss0) / 1024
    return out


def check_same_model(device: torch.device) -> float:
    """The two steps' scores on the same weights and inputs (all rows with an image, where they must agree)."""
    cfg = paper_config(4)
    model = paper_model(cfg).to(device).eval()
    vocab = CLIPConfig().text_config.vocab_size
    m, e = random_batch(4, 3, vocab), random_batch(4, 4, vocab)
    for b in (m, e):
        b["image_mask"][:] = True
    m, e = ({k: v.to(device) for k, v in b.items()} for b in (m, e))
    with torch.no_grad():
        ours = _forward(model, m, e, Timers(device, False), published=False)
        theirs = _forward(model, m, e, Timers(device, False), published=True)
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


def report(results: dict[str, dict]) -> str:
    o, p = results["ours"], results["published"]
    lines = [f"device={o['device']} precision={o['precision']} threads={o['threads']} batch={o['batch']} "
             f"images {IMAGE_SIZE} px, text {TEXT_LEN} tokens, CLIP ViT-B/32 (HF default CLIPConfig), top-k 3",
             f"matmul rate (the best of the run's processes): {o['matmul_gflops']:,.0f} GFLOP/s; model FLOPs per step "
             f"{o['step_flops'] / 1e12:.2f} TFLOP (3x forward)",
             f"{'variant':<13}{'s/step':>7}{'samples/s':>11}{'of matmul rate':>16}{'peak MiB':>10}   split: "
             + " / ".join(PARTS)]
    for r in results.values():
        split = " / ".join(f"{r['split_s'][k]:.2f}" for k in PARTS)
        lines.append(f"{r['variant']:<13}{r['seconds_per_step']:>7.2f}{r['samples_per_s']:>11.1f}"
                     f"{100 * r['matmul_fraction']:>15.1f}%{r['peak_mem_mib']:>10,.0f}   {split} s"
                     + (f"   (processes: {', '.join(f'{t:.2f}' for t in r['all_seconds_per_step'])} s/step)"
                        if len(r.get("all_seconds_per_step", [])) > 1 else ""))
    lines.append(f"speed-up (published / ours): {p['seconds_per_step'] / o['seconds_per_step']:.2f}x   "
                 f"peak memory ratio: {p['peak_mem_mib'] / o['peak_mem_mib']:.2f}x")
    for name, r in results.items():
        if name not in ("ours", "published"):  # same weights and inputs: the first step's loss must agree with ours
            lines.append(f"{name}: {o['seconds_per_step'] / r['seconds_per_step']:.3f}x the speed of ours; first step "
                         f"{r['first_step_s']:.1f} s (ours {o['first_step_s']:.1f} s); first-step loss "
                         f"{r['first_loss']:.6f} (ours {o['first_loss']:.6f})")
    lines.append(f"one gradient norm: {o['split_s']['grad_norm']:.3f} s = "
                 f"{100 * o['split_s']['grad_norm'] / o['seconds_per_step']:.2f}% of our step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 (DeepSpeed's bf16 for ours, autocast for the published step)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--variants", default="published,ours",
                   help="comma-separated, from: " + ", ".join(OPTIONS) + " (published and ours are always run)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the variants this many times, interleaved (published, ours, ..., published, ours, ...), and "
                        "keep each variant's fastest process: a shared machine's speed drifts between processes")
    p.add_argument("--variant", choices=list(OPTIONS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.batch, a.iters, device, a.bf16)))
        return
    diff = check_same_model(device)
    print(f"max |ours - published| score difference on the same weights: {diff:.2e}", flush=True)
    if diff > 1e-3:
        sys.exit("the two steps compute different models; the timing would compare different things")
    variants = ["published", "ours"] + [v for v in a.variants.split(",") if v not in ("published", "ours")]
    unknown = [v for v in variants if v not in OPTIONS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    results: dict[str, dict] = {}
    for r in range(a.rounds):
        for variant in variants:
            cmd = [sys.executable, "-m", "bench.bench_train", "--variant", variant, "--batch", str(a.batch),
                   "--iters", str(a.iters), "--device", a.device] + (["--bf16"] if a.bf16 else [])
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            runs = results.get(variant, {}).get("all_seconds_per_step", []) + [got["seconds_per_step"]]
            rates = results.get(variant, {}).get("all_matmul_gflops", []) + [got["matmul_gflops"]]
            if variant not in results or got["seconds_per_step"] < results[variant]["seconds_per_step"]:
                results[variant] = got
            results[variant]["all_seconds_per_step"], results[variant]["all_matmul_gflops"] = runs, rates
            print(f"round {r + 1}, {variant}: {got['seconds_per_step']:.2f} s/step (this process's matmul rate "
                  f"{got['matmul_gflops']:,.0f} GFLOP/s)", flush=True)
    best_rate = max(rate for res in results.values() for rate in res["all_matmul_gflops"])
    for res in results.values():  # one rate for every variant: the best any process of the run measured
        res["matmul_fraction"] = res["step_flops"] / res["seconds_per_step"] / 1e9 / best_rate
        res["matmul_gflops"] = best_rate
    text = report(results)
    print(text)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"results": results, "score_difference": diff}, fh, indent=1)


if __name__ == "__main__":
    main()
