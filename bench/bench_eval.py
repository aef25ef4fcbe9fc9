"""Whole-KB evaluation speed: our exact and two-stage modes against the published evaluation loop.

    python -m bench.bench_eval [--entities 6000] [--mentions 100] [--baseline-mentions 40]
    python -m bench.bench_eval --device cuda --entities 110000 --mentions 5000 --baseline-mentions 200
    python -m bench.bench_eval --checkpoint runs/NAME/best --shards DIR [--split test]

Matcher level, paper sizes (dt 512, dv 96, hidden 96, 4 experts, top-k 3; 50 text and 50 image
tokens) on precomputed random features (CLIP encoding costs the same in every variant). Each
mention's features are a noisy copy of its gold entity's, so ranks and recall are not pure chance.
Variants, same weights, same inputs, each in its own process (peak memory is its own):
  published  the published evaluation loop: mentions in batches of 20, the KB in chunks of 6,000
             entities; for every (mention batch, entity chunk) the entity side is recomputed
             (``matcher.entity_side`` on the chunk's features) before scoring. Measured on the
             first ``--baseline-mentions`` mentions and extrapolated linearly when fewer than all.
  exact      ours: the entity cache is built once (``matcher.entity_side`` over the KB in blocks,
             included in the time), then ``eval.ranking.exact_ranks``.
  two-stage  ours: the same cache, a FAISS flat inner-product index over the separable vectors
             (``build_index``), then ``two_stage_ranks`` (top-100 re-ranked by the full matcher).
Prints mentions/s and ratios against the baseline, first-stage recall@{10,50,100}, the share of
mentions whose two-stage rank equals the exact rank, the agreement of our exact ranks with the
baseline's, and peak memory (CPU: growth of ru_maxrss; GPU: torch.cuda.max_memory_allocated).

With ``--checkpoint`` and ``--shards`` it instead evaluates a trained export on converted shards
with ``eval.evaluate.evaluate_split`` in both our modes (no baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from bench.bench_matcher import paper_matcher
from eval.metrics import gold_ranks
from eval.ranking import build_index, exact_ranks, recall_at, two_stage_ranks
from moe.features import Features, SideCache
from moe.matcher import MMoEMatcher

TEXT_LEN, IMAGE_LEN, DT, DV = 50, 50, 512, 96
GEN_BLOCK = 1000  # features are generated in seeded blocks: the same on every run and device
PUB_MENTION_BATCH, PUB_ENTITY_CHUNK = 20, 6000  # the published evaluation's sizes
RECALL_KS = (10, 50, 100)


def _block(n: int, seed: int, device: str) -> Features:
    g = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.randint(8, TEXT_LEN + 1, (n,), generator=g, device=device)
    return Features(
        text_global=torch.randn(n, DT, generator=g, device=device),
        text_tokens=torch.randn(n, TEXT_LEN, DT, generator=g, device=device),
        text_mask=torch.arange(TEXT_LEN, device=device)[None] < lengths[:, None],
        image_global=torch.randn(n, DV, generator=g, device=device),
        image_tokens=torch.randn(n, IMAGE_LEN, DV, generator=g, device=device),
        image_mask=torch.rand(n, generator=g, device=device) > 0.1,
    )


def _cat(parts: list[Features]) -> Features:
    names = ("text_global", "text_tokens", "text_mask", "image_global", "image_tokens", "image_mask")
    return Features(*(torch.cat([getattr(p, k) for p in parts]) for k in names))


def kb_features(n: int, device: str) -> Features:
    return _cat([_block(min(GEN_BLOCK, n - s), 1000 + s // GEN_BLOCK, device) for s in range(0, n, GEN_BLOCK)])


def mention_features(kb: Features, m: int, device: str) -> tuple[Features, torch.Tensor]:
    """Mentions = 0.6 x their gold entity's features + 0.8 x noise (gold drawn uniformly)."""
    g = torch.Generator(device=device).manual_seed(7)
    gold = torch.randint(len(kb), (m,), generator=g, device=device)
    noise = _cat([_block(min(GEN_BLOCK, m - s), 500_000 + s // GEN_BLOCK, device) for s in range(0, m, GEN_BLOCK)])
    e = kb.index(gold)
    mix = lambda a, b: 0.6 * a + 0.8 * b  # noqa: E731
    f = Features(mix(e.text_global, noise.text_global), mix(e.text_tokens, noise.text_tokens), e.text_mask,
                 mix(e.image_global, noise.image_global), mix(e.image_tokens, noise.image_tokens), noise.image_mask)
    return f, gold.cpu()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def side_in_blocks(matcher: MMoEMatcher, f: Features, entity: bool, block: int) -> SideCache:
    fn = matcher.entity_side if entity else matcher.mention_side
    return SideCache.cat([fn(f.index(slice(s, s + block)))[0] for s in range(0, len(f), block)])


def run_published(matcher: MMoEMatcher, kb: Features, mentions: Features, gold: torch.Tensor, device: str) -> dict:
    ranks = []
    for m0 in range(0, len(mentions), PUB_MENTION_BATCH):
        m_side = matcher.mention_side(mentions.index(slice(m0, m0 + PUB_MENTION_BATCH)))[0]
        row = torch.empty(len(m_side), len(kb), device=device)
        for e0 in range(0, len(kb), PUB_ENTITY_CHUNK):
            e_side = matcher.entity_side(kb.index(slice(e0, e0 + PUB_ENTITY_CHUNK)))[0]  # recomputed every time
            row[:, e0 : e0 + PUB_ENTITY_CHUNK] = matcher.score(m_side, e_side)["overall"]
        ranks.append(gold_ranks(row, gold[m0 : m0 + PUB_MENTION_BATCH].to(device))[0].cpu())
    return {"ranks": torch.cat(ranks).tolist()}


def run_ours(matcher: MMoEMatcher, kb: Features, mentions: Features, gold: torch.Tensor, device: str, mode: str,
             a: argparse.Namespace) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    cache = side_in_blocks(matcher, kb, True, a.cache_block)  # the one-off entity cache
    _sync(device)
    t1 = time.perf_counter()
    m_side = side_in_blocks(matcher, mentions, False, a.cache_block)
    index = None
    if mode == "exact":
        res = exact_ranks(matcher, m_side, gold, cache, mention_chunk=a.mention_chunk, max_pair_elements=a.max_pair_elements,
                          bf16=a.bf16)
    else:
        index = build_index(matcher.separable_vectors(cache))
        res = two_stage_ranks(matcher, m_side, gold, cache, top_k=a.top_k, index=index, bf16=a.bf16)
    _sync(device)
    t2 = time.perf_counter()
    out = {"ranks": res.rank.tolist(), "cache_s": t1 - t0, "seconds": t2 - t0, "cpu_s": time.process_time() - c0}
    if index is not None:  # reported, not timed
        out["recall"] = recall_at(index, matcher, m_side, gold, RECALL_KS)
    return out


def run_variant(a: argparse.Namespace) -> dict:
    device = a.device
    torch.manual_seed(0)
    matcher = paper_matcher(device).eval()
    kb = kb_features(a.entities, device)
    mentions, gold = mention_features(kb, a.mentions, device)
    if a.variant == "published":
        n = min(a.baseline_mentions, a.mentions)
        mentions, gold = mentions.index(slice(0, n)), gold[:n]
    _sync(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    with torch.no_grad():
        if a.variant == "published":
            c0, t0 = time.process_time(), time.perf_counter()
            out = run_published(matcher, kb, mentions, gold, device)
            _sync(device)
            out["seconds"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        else:
            out = run_ours(matcher, kb, mentions, gold, device, a.variant, a)
    out["mentions"] = len(gold)
    out["gold"] = gold.tolist()
    if device == "cuda":
        out["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:  # ru_maxrss is in KiB on Linux: growth of the process peak while ranking
        out["peak_mem_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return out


def child(a: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_eval", "--variant", variant, "--entities", str(a.entities),
           "--mentions", str(a.mentions), "--baseline-mentions", str(a.baseline_mentions), "--device", a.device,
           "--top-k", str(a.top_k), "--mention-chunk", str(a.mention_chunk), "--max-pair-elements", str(a.max_pair_elements),
           "--cache-block", str(a.cache_block)] + (["--bf16"] if a.bf16 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: list[int], b: list[int]) -> float:
    n = min(len(a), len(b))
    return 100.0 * sum(x == y for x, y in zip(a[:n], b[:n], strict=True)) / max(n, 1)


def synthetic_main(a: argparse.Namespace) -> None:
    print(f"device={a.device} threads={torch.get_num_threads()} load-average={os.getloadavg()[0]:.1f} "
          f"KB={a.entities} entities, {a.mentions} mentions; dt {DT}, dv {DV}, hidden 96, 4 experts, top-k 3, "
          f"text/image tokens {TEXT_LEN}/{IMAGE_LEN}; bf16={a.bf16 and a.device == 'cuda'}")
    res = {v: child(a, v) for v in ("published", "exact", "two-stage")}
    pub, exact, two = res["published"], res["exact"], res["two-stage"]
    n_pub = pub["mentions"]
    pub_total = pub["seconds"] * a.mentions / n_pub
    note = "" if n_pub == a.mentions else f" (measured on {n_pub} mentions, extrapolated linearly to {a.mentions})"
    print(f"published-style loop: mention batches of {PUB_MENTION_BATCH}, KB chunks of {PUB_ENTITY_CHUNK}, "
          f"entity side recomputed per (batch, chunk){note}")
    print(f"ours: entity cache built once in blocks of {a.cache_block} (included); exact mention_chunk {a.mention_chunk}, "
          f"max_pair_elements {a.max_pair_elements}; two-stage flat FAISS index, top-{a.top_k} re-ranked")
    cpu_note = "" if a.device == "cpu" else " (host CPU)"
    print(f"{'variant':<18}{'seconds':>10}{'mentions/s':>12}{'vs published':>14}{'cache s':>9}{'CPU s':>9}"
          f"{'vs published (CPU s)':>22}{'peak MiB':>10}")
    pub_rate, pub_cpu = a.mentions / pub_total, pub["cpu_s"] * a.mentions / n_pub
    print(f"{'published-style':<18}{pub_total:>10.2f}{pub_rate:>12.2f}{1.0:>13.2f}x{'-':>9}{pub_cpu:>9.1f}{1.0:>21.2f}x"
          f"{pub['peak_mem_mib']:>10.0f}")
    for name, r in (("ours exact", exact), ("ours two-stage", two)):
        rate = a.mentions / r["seconds"]
        print(f"{name:<18}{r['seconds']:>10.2f}{rate:>12.2f}{rate / pub_rate:>13.2f}x{r['cache_s']:>9.2f}{r['cpu_s']:>9.1f}"
              f"{pub_cpu / r['cpu_s']:>21.2f}x{r['peak_mem_mib']:>10.0f}")
    print(f"seconds: wall clock; CPU s: user+system CPU seconds of the variant's process{cpu_note}, which other jobs on "
          "the machine do not inflate")
    print("first-stage recall: " + ", ".join(f"{k} {v:.1f}%" for k, v in two["recall"].items()))
    print(f"two-stage rank == exact rank: {agreement(two['ranks'], exact['ranks']):.1f}% of {a.mentions} mentions")
    print(f"ours exact rank == published-style rank: {agreement(exact['ranks'], pub['ranks']):.1f}% of the {n_pub} "
          "mentions both scored")
    if exact["gold"][:n_pub] != pub["gold"]:
        print("WARNING: the variants did not see the same gold entities")


def checkpoint_main(a: argparse.Namespace) -> None:
    from eval.evaluate import evaluate_split, one_line
    from model.export import load_export

    device = torch.device(a.device)
    model, cfg = load_export(a.checkpoint)
    model.to(device)
    cfg.data.shards = str(a.shards)
    print(f"checkpoint {a.checkpoint} on {a.shards} ({a.split}); device={a.device} threads={torch.get_num_threads()}")
    results = {}
    for mode in ("exact", "two-stage"):
        cfg.eval.mode = mode
        results[mode] = evaluate_split(model, cfg, a.split, device)
        t = results[mode].timings
        print(f"{mode:<10} " + one_line(results[mode]))
        print(f"{'':<10} timings: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    exact = {r["index"]: r["rank"] for r in results["exact"].per_mention}
    two = {r["index"]: r["rank"] for r in results["two-stage"].per_mention}
    same = sum(exact[i] == two[i] for i in exact)
    print(f"two-stage rank == exact rank: {100.0 * same / max(len(exact), 1):.1f}% of {len(exact)} mentions; "
          f"speed-up two-stage / exact: {results['exact'].timings['total_s'] / results['two-stage'].timings['total_s']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entities", type=int, default=6000)
    p.add_argument("--mentions", type=int, default=100)
    p.add_argument("--baseline-mentions", type=int, default=40, help="mentions the published-style loop scores (extrapolated)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top-k", type=int, default=100, help="two-stage candidates")
    p.add_argument("--mention-chunk", type=int, default=64, help="exact mode: mentions scored together (eval.mention_chunk)")
    p.add_argument("--max-pair-elements", type=int, default=1 << 26, help="exact mode: attention elements per block")
    p.add_argument("--cache-block", type=int, default=1000, help="entities per entity_side call when building the cache")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in our modes on GPUs (default fp32 everywhere)")
    p.add_argument("--checkpoint", help="trained model export (with --shards): evaluate it in both our modes")
    p.add_argument("--shards", help="converted shards for --checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--variant", choices=["published", "exact", "two-stage"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.variant:
        print(json.dumps(run_variant(a)))
    elif a.checkpoint or a.shards:
        if not (a.checkpoint and a.shards):
            p.error("--checkpoint and --shards go together")
        checkpoint_main(a)
    else:
        synthetic_main(a)


if __name__ == "__main__":
    main()
