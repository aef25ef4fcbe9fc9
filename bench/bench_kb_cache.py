"""The compact entity cache: size, exact-scoring speed, rank agreement with fp32, save/load time.

    python -m bench.bench_kb_cache [--entities 3000] [--mentions 200] [--device cpu|cuda]

Matcher level at the paper's sizes (``bench.bench_matcher.paper_matcher``; random features from
``bench.bench_eval``: each mention a noisy copy of its gold entity, by default a very noisy one, so
that many mentions have near-ties and the agreement figures are not trivially 100%). The fp32 entity cache is built
once (``matcher.entity_side`` in blocks: the rebuild time, without the CLIP encoding a real KB also
pays), then for each cache dtype: its bytes, ``eval.kb_cache.compress`` time, save time, memory-mapped
load time, and ``eval.ranking.exact_ranks`` mentions/s on the loaded (memory-mapped) cache, with the
share of mentions whose rank equals the fp32 rank, the largest rank change and the largest change
of a mention's best score.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from bench.bench_eval import kb_features, mention_features, side_in_blocks
from bench.bench_matcher import paper_matcher
from eval.kb_cache import CACHE_DTYPES, cache_bytes, compress, load_kb_cache, save_kb_cache
from eval.ranking import Clock, exact_ranks

KEY = "0" * 64  # the bench's files are its own: any fixed key


def _timed(fn, device: str):
    clock = Clock(torch.device(device))
    out = fn()
    return out, clock.lap()


def run(a: argparse.Namespace) -> list[dict]:
    dev = a.device
    matcher = paper_matcher(dev).eval()
    kb_f = kb_features(a.entities, dev)
    m_f, gold = mention_features(kb_f, a.mentions, dev, signal=a.signal)
    with torch.no_grad():
        full, rebuild_s = _timed(lambda f=kb_f: side_in_blocks(matcher, f, True, a.cache_block), dev)
        mentions = side_in_blocks(matcher, m_f, False, a.cache_block)
    del kb_f, m_f
    rows, ref = [], None
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for dtype in a.dtypes:
            small, compress_s = _timed(lambda d=dtype: compress(full, d), dev)
            path = Path(tmp) / f"kb_cache-{dtype}.pt"
            _, save_s = _timed(lambda s=small, p=path: save_kb_cache(p, s, KEY), dev)
            loaded, load_s = _timed(lambda p=path: load_kb_cache(p, KEY), dev)
            loaded = loaded.to(dev)  # CPU: no copy, still memory-mapped
            res, rank_s = _timed(lambda c=loaded: exact_ranks(matcher, mentions, gold, c, mention_chunk=a.mention_chunk,
                                                              max_pair_elements=a.max_pair_elements, bf16=a.bf16), dev)
            ref = res if ref is None else ref
            rows.append({"dtype": dtype, "mib": cache_bytes(small) / 2**20, "compress_s": compress_s, "save_s": save_s,
                         "load_s": load_s, "file_mib": path.stat().st_size / 2**20, "mentions_s": a.mentions / rank_s,
                         "same": 100.0 * (res.rank == ref.rank).double().mean().item(),
                         "max_diff": int((res.rank - ref.rank).abs().max()), "rebuild_s": rebuild_s,
                         "top1_diff": float((res.top_scores[:, 0] - ref.top_scores[:, 0]).abs().max()),
                         "top1_range": (float(ref.top_scores[:, 0].min()), float(ref.top_scores[:, 0].max()))})
            del small, loaded
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entities", type=int, default=3000)
    p.add_argument("--mentions", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=list(CACHE_DTYPES), choices=CACHE_DTYPES,
                   help="cache dtypes to compare; the first is the reference (default: float32 first)")
    p.add_argument("--mention-chunk", type=int, default=64)
    p.add_argument("--max-pair-elements", type=int, default=0, help="attention-map elements per block (0: automatic)")
    p.add_argument("--signal", type=float, default=0.1,
                   help="weight of the gold entity in a mention's features (0.1: H@1 ~35%%, many near-ties; 0.6: easy)")
    p.add_argument("--cache-block", type=int, default=1000, help="entities per entity_side call when building the cache")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast while scoring on GPUs (default fp32)")
    p.add_argument("--dir", help="folder for the saved caches (default: the system's temp folder)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"device={a.device} threads={torch.get_num_threads()} load-average={os.getloadavg()[0]:.1f} "
          f"KB={a.entities} entities, {a.mentions} mentions; paper-size matcher, exact scoring")
    rows = run(a)
    ref = rows[0]
    print(f"{'dtype':<10}{'cache MiB':>10}{'vs ' + ref['dtype']:>12}{'compress s':>11}{'save s':>8}{'mmap load s':>12}"
          f"{'mentions/s':>11}{'same rank %':>12}{'max |Δrank|':>12}{'max |Δtop-1 score|':>19}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['mib']:>10.1f}{r['mib'] / ref['mib']:>11.2f}x{r['compress_s']:>11.2f}{r['save_s']:>8.2f}"
              f"{r['load_s']:>12.3f}{r['mentions_s']:>11.1f}{r['same']:>12.1f}{r['max_diff']:>12d}{r['top1_diff']:>19.2e}")
    print(f"rebuilding the {ref['dtype']} cache from precomputed features (matcher.entity_side, no CLIP): "
          f"{ref['rebuild_s']:.2f} s; ranks and scores compared with the {ref['dtype']} cache's (best scores "
          f"{ref['top1_range'][0]:.2f} to {ref['top1_range'][1]:.2f}); load-average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
