"""Matcher forward+backward at the paper's sizes: ours vs a published-style implementation.

    python -m bench.bench_matcher [--batch 32] [--iters 5] [--device cpu|cuda]

Sizes: batch 32 mentions x 32 gold entities, 50 text tokens (dt 512), 50 image tokens (dv 96),
hidden 96, 4 experts d -> 4d -> out, top-k 3 (the faithful matcher at the paper's sizes, no CLIP).
The baseline (bench/published_style.py) is the same model computed the way the published code
computes it: dense experts, the [N, M, L, L] attention with its value product, no cache. Each variant runs in its own process so
its peak memory is its own; both are checked to give the same scores first. Prints seconds per
step, the speed ratio and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.published_style import published_style_scores
from moe.features import Features
from moe.matcher import MMoEMatcher
from moe.published import published_matcher


def paper_matcher(device: str) -> MMoEMatcher:
    torch.manual_seed(0)
    return published_matcher(top_k=3, compat=False).to(device)


def random_features(n: int, seed: int, device: str, text_len: int = 50, image_len: int = 50) -> Features:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, text_len + 1, (n,), generator=g)
    f = Features(
        text_global=torch.randn(n, 512, generator=g),
        text_tokens=torch.randn(n, text_len, 512, generator=g),
        text_mask=torch.arange(text_len)[None] < lengths[:, None],
        image_global=torch.randn(n, 96, generator=g),
        image_tokens=torch.randn(n, image_len, 96, generator=g),
        image_mask=torch.rand(n, generator=g) > 0.1,
    )
    return Features(*(t.to(device) for t in (f.text_global, f.text_tokens, f.text_mask, f.image_global,
                                             f.image_tokens, f.image_mask)))


def ours(matcher: MMoEMatcher, m: Features, e: Features) -> torch.Tensor:
    return matcher.score(matcher.mention_side(m)[0], matcher.entity_side(e)[0])["overall"]


def run_variant(variant: str, batch: int, iters: int, device: str) -> dict:
    matcher = paper_matcher(device)
    m, e = random_features(batch, 1, device), random_features(batch, 2, device)
    fn = ours if variant == "ours" else published_style_scores
    target = torch.arange(batch, device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    times = []
    for i in range(iters + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.cross_entropy(fn(matcher, m, e), target)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # first step is warm-up
            times.append(time.perf_counter() - t0)
        matcher.zero_grad(set_to_none=True)
    out = {"variant": variant, "seconds_per_step": statistics.median(times)}
    if device == "cuda":
        out["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:  # ru_maxrss is in KiB on Linux: growth of the process peak during the steps
        out["peak_mem_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return out


def check_equal(device: str) -> float:
    matcher = paper_matcher(device).eval()
    m, e = random_features(4, 3, device), random_features(5, 4, device)
    with torch.no_grad():
        a, b = ours(matcher, m, e), published_style_scores(matcher, m, e)
    return (a - b).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", choices=["ours", "published"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.iters, args.device)))
        return
    diff = check_equal(args.device)
    print(f"max |ours - published-style| score difference: {diff:.2e}")
    if diff > 1e-3:
        sys.exit("the two implementations disagree; the timing would compare different models")
    results = {}
    for variant in ("published", "ours"):
        cmd = [sys.executable, "-m", "bench.bench_matcher", "--variant", variant, "--batch", str(args.batch),
               "--iters", str(args.iters), "--device", args.device]
        stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(stdout.strip().splitlines()[-1])
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
          "text/image tokens=50/50 experts=4 top-k=3")
    print(f"{'variant':<12}{'s/step':>10}{'peak MiB':>11}")
    for v in ("published", "ours"):
        r = results[v]
        print(f"{v:<12}{r['seconds_per_step']:>10.3f}{r['peak_mem_mib']:>11.1f}")
    speed = results["published"]["seconds_per_step"] / results["ours"]["seconds_per_step"]
    mem = results["published"]["peak_mem_mib"] / max(results["ours"]["peak_mem_mib"], 1e-6)
    print(f"speed-up (published-style / ours): {speed:.1f}x   peak-memory ratio: {mem:.1f}x")


if __name__ == "__main__":
    main()
