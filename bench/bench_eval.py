"""Whole-KB evaluation speed: our exact and two-stage modes against the published evaluation loop.

    python -m bench.bench_eval [--entities 6000] [--mentions 200] [--json PATH]
    python -m bench.bench_eval --entities 110000 --mentions 5000 --no-exact      # WikiMEL size on a CPU
    python -m bench.bench_eval --device cuda --entities 110000 --mentions 5000 --bf16 --json gpu.json
    python -m bench.bench_eval --checkpoint runs/NAME/best --shards DIR [--split test]

Matcher level, paper sizes (dt 512, dv 96, hidden 96, 4 experts d -> 4d -> out, top-k 3; 50 text and
50 image tokens) on precomputed random features (CLIP encoding costs the same in every variant). Each
mention's features are a noisy copy of its gold entity's, so ranks and recall are not pure chance.
Variants, same weights, same inputs, each in its own process (peak memory is its own):

  published  the published evaluation loop, written the straightforward way
             (bench/published_style.py: dense experts, the [N, M, Lq, Lk] attention with its value
             product, nothing cached): mentions in batches of 20, the KB in chunks of 6,000 entities,
             every side recomputed for every (mention batch, entity chunk). Measured on
             ``--baseline-mentions`` mentions against the first ``--baseline-entities`` KB rows and
             extrapolated linearly in both (the loop's cost is linear in each).
  exact      ours: the entity cache built once (``matcher.entity_side`` in blocks; included), the
             mention side, then ``eval.ranking.exact_ranks``.
  two-stage  ours: the same cache, a flat FAISS inner-product index over the separable vectors, the
             top-100 re-ranked by the full matcher (``two_stage_ranks``). Also timed with the cache
             saved once and memory-mapped back (a repeated evaluation).

Beside the throughputs it prints the machine's fp32 matmul rate measured in the same run, the
fraction of it that the entity cache and the exact pair scoring reach (FLOPs counted from the
shapes), the targets of issue 14, rank agreement (exact vs the published loop, two-stage vs exact)
and first-stage recall. ``--json PATH`` writes the figures for comparison between runs.

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
import tempfile
import time

import torch

from bench.bench_matcher import paper_matcher
from bench.published_style import published_style_scores
from eval.kb_cache import load_kb_cache, save_kb_cache
from eval.metrics import gold_ranks
from eval.ranking import Clock, exact_ranks, kb_index, recall_at, two_stage_ranks
from moe.features import Features, SideCache
from moe.matcher import MMoEMatcher
from moe.switch import SwitchMoE

TEXT_LEN, IMAGE_LEN, DT, DV = 50, 50, 512, 96
GEN_BLOCK = 1000  # features are generated in seeded blocks: the same on every run and device
PUB_MENTION_BATCH, PUB_ENTITY_CHUNK = 20, 6000  # the published evaluation's sizes
RECALL_KS = (10, 50, 100)
# Issue 14's targets: fractions of the fp32 matmul rate, and speed-ups over the published loop.
TARGET_EXACT_SCORING, TARGET_KB = 0.30, 0.40
TARGET_EXACT_SPEEDUP, TARGET_TWO_STAGE_SPEEDUP = 10.0, {6000: 100.0, 110000: 1000.0}
TARGET_GPU_SECONDS = {"exact": 60.0, "two_stage": 10.0}  # on an H100, WikiMEL size


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


class SyntheticKB:
    """KB features generated block by block from fixed seeds, any block on demand: a WikiMEL-size KB
    (11 GB of fp32 text tokens) never has to sit in memory at once."""

    def __init__(self, n: int, device: str) -> None:
        self.n, self.device = n, device

    def __len__(self) -> int:
        return self.n

    def block(self, start: int) -> Features:
        """Rows ``start`` .. ``start + GEN_BLOCK`` (``start`` a multiple of GEN_BLOCK)."""
        return _block(min(GEN_BLOCK, self.n - start), 1000 + start // GEN_BLOCK, self.device)

    def blocks(self, stop: int | None = None):
        stop = self.n if stop is None else stop
        for start in range(0, stop, GEN_BLOCK):
            f = self.block(start)
            yield f if start + len(f) <= stop else f.index(slice(0, stop - start))

    def index(self, rows: torch.Tensor) -> Features:
        """The features of KB rows ``rows``, in that order."""
        rows = rows.to(self.device)
        parts, where = [], []
        for start in torch.unique(rows // GEN_BLOCK).tolist():
            pick = torch.nonzero(rows // GEN_BLOCK == start).flatten()
            parts.append(self.block(start * GEN_BLOCK).index(rows[pick] - start * GEN_BLOCK))
            where.append(pick)
        order = torch.argsort(torch.cat(where))
        return Features.cat(parts).index(order)


def kb_features(n: int, device: str) -> Features:
    return Features.cat(list(SyntheticKB(n, device).blocks()))


def mention_features(kb: Features | SyntheticKB, m: int, device: str, signal: float = 0.6) -> tuple[Features, torch.Tensor]:
    """Mentions = ``signal`` x their gold entity's features + 0.8 x noise (gold drawn uniformly)."""
    g = torch.Generator(device=device).manual_seed(7)
    gold = torch.randint(len(kb), (m,), generator=g, device=device)
    noise = Features.cat([_block(min(GEN_BLOCK, m - s), 500_000 + s // GEN_BLOCK, device) for s in range(0, m, GEN_BLOCK)])
    e = kb.index(gold)
    mix = lambda a, b: signal * a + 0.8 * b  # noqa: E731
    f = Features(mix(e.text_global, noise.text_global), mix(e.text_tokens, noise.text_tokens), e.text_mask,
                 mix(e.image_global, noise.image_global), mix(e.image_tokens, noise.image_tokens), noise.image_mask)
    return f, gold.cpu()


def baseline_rows(gold: torch.Tensor, n_mentions: int, n_entities: int) -> torch.Tensor:
    """The mentions the published loop scores: the first ``n_mentions`` whose gold lies in the KB prefix
    it sees (so both variants rank them against the same ``n_entities`` entities)."""
    return torch.nonzero(gold < n_entities).flatten()[:n_mentions]


# ---- FLOPs from the shapes ------------------------------------------------------------------------

def entity_side_flops(matcher: MMoEMatcher, text_len: int = TEXT_LEN, image_len: int = IMAGE_LEN) -> float:
    """Multiply-adds x 2 of one entity's matcher side: every MoE layer's k routes per token through
    ``d -> d_ff -> d_out`` plus the units' projections (norms, softmaxes and routers not counted)."""
    s = matcher.settings
    flops = 0.0
    for name, unit in matcher.units.items():
        moe = unit.moe
        if not isinstance(moe, SwitchMoE):
            raise TypeError("FLOP counting knows the local backend's SwitchMoE only")
        spec = moe.spec
        per_route = 2 * (spec.d_model * spec.d_ff + spec.d_ff * spec.d_out)
        if name == "cross":
            # text_fc / image_fc on globals and tokens, two routed sequences of L + 1 rows each
            flops += 2 * s.cross_dim * ((text_len + 1) * s.text_dim + (image_len + 1) * s.image_dim)
            flops += per_route * spec.top_k * ((image_len + 1) + (text_len + 1))
        else:
            length = text_len if name == "text" else image_len
            flops += per_route * spec.top_k * (length + 1) + 2 * length * s.hidden * s.hidden  # MoE + W_q
    return flops


def pair_flops(matcher: MMoEMatcher) -> float:
    """One (mention, entity) pair's scoring: the g2l logits GEMM of each intra unit (2 Lq Lk h); the
    pooling and value product (mean taken first) and the separable parts are under 3% more."""
    lengths = {"text": (TEXT_LEN, TEXT_LEN), "vision": (IMAGE_LEN, IMAGE_LEN)}
    return sum(2.0 * lq * lk * matcher.settings.hidden for u, (lq, lk) in lengths.items() if u in matcher.units)


def matmul_gflops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Best of a few square matmuls (2048 on CPU, 8192 on GPU): the machine's measured rate."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n**3 / best / 1e9


# ---- variants (each in its own process) ------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def side_in_blocks(matcher: MMoEMatcher, f: Features, entity: bool, block: int) -> SideCache:
    fn = matcher.entity_side if entity else matcher.mention_side
    return SideCache.cat([fn(f.index(slice(s, s + block)))[0] for s in range(0, len(f), block)])


def run_published(matcher: MMoEMatcher, kb: Features, mentions: Features, gold: torch.Tensor, device: str) -> dict:
    ranks = []
    for m0 in range(0, len(mentions), PUB_MENTION_BATCH):
        batch = mentions.index(slice(m0, m0 + PUB_MENTION_BATCH))
        row = torch.empty(len(batch), len(kb), device=device)
        for e0 in range(0, len(kb), PUB_ENTITY_CHUNK):  # every side recomputed for every chunk
            chunk = kb.index(slice(e0, e0 + PUB_ENTITY_CHUNK))
            row[:, e0 : e0 + PUB_ENTITY_CHUNK] = published_style_scores(matcher, batch, chunk)
        ranks.append(gold_ranks(row, gold[m0 : m0 + PUB_MENTION_BATCH].to(device))[0].cpu())
    return {"ranks": torch.cat(ranks).tolist()}


def build_cache(matcher: MMoEMatcher, kb: SyntheticKB, device: str) -> tuple[SideCache, float]:
    """The entity cache of the whole KB, one generated block at a time; seconds spent in the matcher
    (generating the random features is not counted: a real KB's features come from CLIP)."""
    parts, seconds, clock = [], 0.0, Clock(torch.device(device))
    for f in kb.blocks():
        clock.lap()  # generating the block: not counted
        parts.append(matcher.entity_side(f)[0])
        seconds += clock.lap()
    return SideCache.cat(parts), seconds


def run_ours(matcher: MMoEMatcher, kb: SyntheticKB, mentions: Features, gold: torch.Tensor, base: torch.Tensor,
             n_base_entities: int, device: str, mode: str, a: argparse.Namespace) -> dict:
    cache, cache_s = build_cache(matcher, kb, device)  # the one-off entity cache
    clock = Clock(torch.device(device))
    times = {"cache_s": cache_s}
    m_side = side_in_blocks(matcher, mentions, False, GEN_BLOCK)
    times["mentions_s"] = clock.lap()
    out: dict = {}
    if mode == "exact":
        res = exact_ranks(matcher, m_side, gold, cache, mention_chunk=a.mention_chunk, max_pair_elements=a.max_pair_elements,
                          bf16=a.bf16)
        times["scoring_s"] = clock.lap()
        # Not timed: the baseline's mentions ranked against the KB prefix the baseline saw.
        prefix = exact_ranks(matcher, m_side.select(base.to(device)), gold[base], cache.slice(0, n_base_entities),
                             max_pair_elements=a.max_pair_elements, bf16=a.bf16)
        out["prefix_ranks"] = prefix.rank.tolist()
    else:
        index = kb_index(matcher, cache, rows=len(m_side))
        times["index_s"] = clock.lap()
        stages: dict[str, float] = {}
        res = two_stage_ranks(matcher, m_side, gold, cache, top_k=a.top_k, index=index, bf16=a.bf16, timings=stages)
        times["ranking_s"] = clock.lap()
        out["recall"] = recall_at(index, matcher, m_side, gold, RECALL_KS)  # reported, not timed
        out["saved_cache"] = saved_cache_seconds(cache, device)
    seconds = sum(times.values())  # search_s and rerank_s (below) are parts of ranking_s
    if mode != "exact":
        times.update(search_s=stages["search_s"], rerank_s=stages["rerank_s"])
    out.update(ranks=res.rank.tolist(), times=times, seconds=seconds)
    return out


def saved_cache_seconds(cache: SideCache, device: str) -> dict:
    """Save the entity cache once (eval.kb_cache.save_kb_cache, as eval.evaluate does) and time reading it
    back memory-mapped (load_kb_cache), then every page (onto the GPU there)."""
    key = "0" * 64  # the bench's file is its own: any fixed key
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kb_cache.pt")
        t = time.perf_counter()
        save_kb_cache(path, cache, key)
        save_s = time.perf_counter() - t
        size = os.path.getsize(path)
        clock = Clock(torch.device(device))
        loaded = load_kb_cache(path, key)
        open_s = clock.lap()
        touched = {k: v.to(device, copy=True) for k, v in loaded.tensors.items()}
        load_s = open_s + clock.lap()
        del touched, loaded
    return {"save_s": save_s, "open_s": open_s, "load_s": load_s, "bytes": size}


def run_variant(a: argparse.Namespace) -> dict:
    device = a.device
    torch.manual_seed(0)
    matcher = paper_matcher(device).eval()
    kb = SyntheticKB(a.entities, device)
    mentions, gold = mention_features(kb, a.mentions, device)
    n_base_entities = min(a.baseline_entities or a.entities, a.entities)
    base = baseline_rows(gold, a.baseline_mentions, n_base_entities)
    _sync(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    with torch.no_grad():
        if a.variant == "published":
            t0 = time.perf_counter()
            prefix = Features.cat(list(kb.blocks(n_base_entities)))
            out = run_published(matcher, prefix, mentions.index(base.to(device)), gold[base], device)
            _sync(device)
            out["seconds"] = time.perf_counter() - t0
            out["mentions_scored"], out["entities_scored"] = len(base), n_base_entities
        else:
            out = run_ours(matcher, kb, mentions, gold, base, n_base_entities, device, a.variant, a)
    out["flops"] = {"entity": entity_side_flops(matcher), "pair": pair_flops(matcher)}
    if device == "cuda":
        out["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        out["device_name"] = torch.cuda.get_device_name()
    else:  # ru_maxrss is in KiB on Linux: growth of the process peak while ranking
        out["peak_mem_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return out


def child(a: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_eval", "--variant", variant, "--entities", str(a.entities),
           "--mentions", str(a.mentions), "--baseline-mentions", str(a.baseline_mentions), "--baseline-entities",
           str(a.baseline_entities), "--device", a.device, "--top-k", str(a.top_k), "--mention-chunk", str(a.mention_chunk),
           "--max-pair-elements", str(a.max_pair_elements)] + (["--bf16"] if a.bf16 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: list[int], b: list[int]) -> float:
    if len(a) != len(b):
        raise ValueError(f"rank lists of different lengths: {len(a)} and {len(b)}")
    return 100.0 * sum(x == y for x, y in zip(a, b, strict=True)) / max(len(a), 1)


# ---- report ------------------------------------------------------------------------------------------

def summarize_figures(a: argparse.Namespace, res: dict, matmul: float) -> dict:
    """The figures of one run (JSON-ready). Without the exact variant (``--no-exact``) its fields are None
    and the entity-cache rate comes from the two-stage variant."""
    pub, exact, two = res["published"], res.get("exact"), res["two-stage"]
    n, m = a.entities, a.mentions
    pub_seconds = pub["seconds"] * (m / pub["mentions_scored"]) * (n / pub["entities_scored"])
    t_2 = two["times"]
    reused = two["saved_cache"]["load_s"] + t_2["mentions_s"] + t_2["index_s"] + t_2["ranking_s"]
    kb_rate = n / (exact or two)["times"]["cache_s"]
    scoring_rate = n * m / exact["times"]["scoring_s"] if exact else None
    seconds = {"published": pub_seconds, "exact": exact["seconds"] if exact else None, "two_stage": two["seconds"],
               "two_stage_cache_reused": reused}
    return {
        "device": res["device"], "entities": n, "mentions": m, "bf16": bool(a.bf16 and a.device == "cuda"),
        "matmul_gflops_fp32": matmul, "load_average": os.getloadavg()[0],
        "pairs_per_s": {k: (n * m / v if v else None) for k, v in seconds.items()},
        "seconds": seconds,
        "published_measured_on": {"mentions": pub["mentions_scored"], "entities": pub["entities_scored"],
                                  "seconds": pub["seconds"]},
        "kb_entities_per_s": kb_rate,
        "kb_matmul_fraction": kb_rate * two["flops"]["entity"] / 1e9 / matmul,
        "exact_scoring_pairs_per_s": scoring_rate,
        "exact_scoring_matmul_fraction": scoring_rate * two["flops"]["pair"] / 1e9 / matmul if exact else None,
        "speedup": {k: (pub_seconds / v if v else None) for k, v in seconds.items() if k != "published"},
        "two_stage_split_s": {k: t_2[k] for k in ("cache_s", "mentions_s", "index_s", "search_s", "rerank_s")},
        "saved_cache": two["saved_cache"],
        "rank_agreement": agreement(exact["prefix_ranks"], pub["ranks"]) if exact else None,
        "two_stage_rank_agreement": agreement(two["ranks"], exact["ranks"]) if exact else None,
        "recall": two["recall"],
        "peak_mem_mib": {k: r["peak_mem_mib"] for k, r in res.items() if isinstance(r, dict) and "peak_mem_mib" in r},
    }


def _status(value: float, target: float, unit: str = "") -> str:
    return f"target >= {target:g}{unit}: {'met' if value >= target else 'NOT met'}"


def print_report(f: dict, a: argparse.Namespace) -> None:
    pm = f["published_measured_on"]
    note = ("" if (pm["mentions"], pm["entities"]) == (f["mentions"], f["entities"]) else
            f" (measured on {pm['mentions']} mentions x {pm['entities']} entities in {pm['seconds']:.1f} s, extrapolated "
            "linearly)")
    print(f"published-style loop: mention batches of {PUB_MENTION_BATCH}, KB chunks of {PUB_ENTITY_CHUNK}, every side "
          f"recomputed per (batch, chunk){note}")
    print(f"{'variant':<26}{'seconds':>10}{'pairs/s':>14}{'vs published':>14}")
    for name, key in (("published-style", "published"), ("ours exact", "exact"), ("ours two-stage", "two_stage"),
                      ("ours two-stage, saved cache", "two_stage_cache_reused")):
        if f["seconds"][key] is None:
            continue
        ratio = f["speedup"].get(key, 1.0)
        print(f"{name:<26}{f['seconds'][key]:>10.2f}{f['pairs_per_s'][key]:>14.0f}{ratio:>13.1f}x")
    mm = f["matmul_gflops_fp32"]
    print(f"fp32 matmul rate, this run: {mm:.0f} GFLOP/s")
    print(f"entity cache: {f['kb_entities_per_s']:.0f} entities/s = {100 * f['kb_matmul_fraction']:.0f}% of matmul "
          f"({_status(100 * f['kb_matmul_fraction'], 100 * TARGET_KB, '%')})")
    if f["exact_scoring_pairs_per_s"] is not None:
        print(f"exact pair scoring: {f['exact_scoring_pairs_per_s']:.0f} pairs/s = "
              f"{100 * f['exact_scoring_matmul_fraction']:.0f}% of matmul "
              f"({_status(100 * f['exact_scoring_matmul_fraction'], 100 * TARGET_EXACT_SCORING, '%')})")
        exact_x = f["speedup"]["exact"]
        print(f"exact end to end vs published: {exact_x:.1f}x ({_status(exact_x, TARGET_EXACT_SPEEDUP, 'x')})")
    target = TARGET_TWO_STAGE_SPEEDUP.get(f["entities"])
    for key, label in (("two_stage", "cache built"), ("two_stage_cache_reused", "cache saved and memory-mapped")):
        status = f" ({_status(f['speedup'][key], target, 'x')})" if target else ""
        print(f"two-stage vs published, {label}: {f['speedup'][key]:.1f}x{status}")
    if f["device"] != "cpu" and not f["device"].startswith("cpu") and f["entities"] >= 110000:
        for key, limit in TARGET_GPU_SECONDS.items():
            if f["seconds"][key] is None:
                continue
            met = "met" if f["seconds"][key] < limit else "NOT met"
            print(f"{key} at WikiMEL size on this GPU: {f['seconds'][key]:.1f} s (H100 target < {limit:g} s: {met})")
    split = f["two_stage_split_s"]
    print("two-stage time split (s): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in split.items()))
    sc = f["saved_cache"]
    print(f"saved entity cache: {sc['bytes'] / 2**20:.0f} MiB, saved in {sc['save_s']:.2f} s, opened (mmap) in "
          f"{sc['open_s']:.3f} s, every page read in {sc['load_s']:.2f} s")
    print("first-stage recall: " + ", ".join(f"{k} {v:.1f}%" for k, v in f["recall"].items()))
    if f["rank_agreement"] is not None:
        print(f"rank agreement, ours exact vs published-style loop: {f['rank_agreement']:.1f}% of the {pm['mentions']} "
              f"mentions it scored; two-stage vs exact: {f['two_stage_rank_agreement']:.1f}% of {f['mentions']}")
    print("peak memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in f["peak_mem_mib"].items()))


def synthetic_main(a: argparse.Namespace) -> None:
    matmul = matmul_gflops(a.device)
    print(f"device={a.device} threads={torch.get_num_threads()} load-average={os.getloadavg()[0]:.1f} "
          f"KB={a.entities} entities, {a.mentions} mentions; dt {DT}, dv {DV}, hidden 96, 4 experts, top-k 3, "
          f"text/image tokens {TEXT_LEN}/{IMAGE_LEN}; bf16={a.bf16 and a.device == 'cuda'}")
    res: dict = {v: child(a, v) for v in ("published", "exact", "two-stage") if not (a.no_exact and v == "exact")}
    res["device"] = res["two-stage"].get("device_name", f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    matmul = max(matmul, matmul_gflops(a.device))  # best of before and after: the machine's rate
    figures = summarize_figures(a, res, matmul)
    print_report(figures, a)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(figures, fh, indent=1)
        print(f"figures written to {a.json}")


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
    p.add_argument("--mentions", type=int, default=200)
    p.add_argument("--baseline-mentions", type=int, default=20, help="mentions the published-style loop scores")
    p.add_argument("--baseline-entities", type=int, default=PUB_ENTITY_CHUNK,
                   help="KB rows the published-style loop scores (0: all); its time is extrapolated to the whole KB")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top-k", type=int, default=100, help="two-stage candidates")
    p.add_argument("--mention-chunk", type=int, default=64, help="exact mode: mentions scored together (eval.mention_chunk)")
    p.add_argument("--max-pair-elements", type=int, default=0,
                   help="exact mode: attention-map elements per block (eval.max_pair_elements; 0 = automatic)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in our modes on GPUs (default fp32 everywhere)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--no-exact", action="store_true",
                   help="skip the exact variant (WikiMEL size on a CPU: hours); its figures are then null")
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
