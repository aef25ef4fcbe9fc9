"""The compact entity cache: size, exact-scoring speed, rank agreement with fp32, save/load time and
the cost of the saved file's tensor digests.

    python -m bench.bench_kb_cache [--entities 3000] [--mentions 200] [--device cpu|cuda]
    python -m bench.bench_kb_cache --cache-only --entities 109976 --dtypes float32 int8   # WikiMEL size

Matcher level at the paper's sizes (``bench.bench_matcher.paper_matcher``; random features from
``bench.bench_eval``: each mention a noisy copy of its gold entity, by default a very noisy one, so
that many mentions have near-ties and the agreement figures are not trivially 100%). The fp32 entity cache is built
once (``matcher.entity_side`` in blocks: the rebuild time, without the CLIP encoding a real KB also
pays), then for each cache dtype: its bytes, ``eval.kb_cache.compress`` time, save time, memory-mapped
load time, and ``eval.ranking.exact_ranks`` mentions/s on the loaded (memory-mapped) cache, with the
share of mentions whose rank equals the fp32 rank, the largest rank change and the largest change
of a mention's best score.

Digests: the save time includes hashing every tensor (sha256 per 64 MiB block, ``digest s`` alone),
and the load is timed twice on the same file, memory-mapped without the digest check
(``load_kb_cache(verify=False)``) and with it (the default: every byte is read and hashed once);
``verify x`` is their ratio. ``--cache-only`` skips the scoring: the cache of the first
``--sample-entities`` entities is tiled to ``--entities`` rows (the paper matcher's shapes and
dtypes, so the bytes are those of a real cache of that size) and only sizes, save and load are timed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from bench.bench_eval import kb_features, mention_features, side_in_blocks
from bench.bench_matcher import paper_matcher
from eval.kb_cache import CACHE_DTYPES, cache_bytes, compress, load_kb_cache, save_kb_cache, tensor_digests
from eval.ranking import Clock, exact_ranks
from moe.features import SideCache

KEY = "0" * 64  # the bench's files are its own: any fixed key


def _timed(fn, device: str):
    clock = Clock(torch.device(device))
    out = fn()
    return out, clock.lap()


def tiled(cache: SideCache, rows: int) -> SideCache:
    """``cache``'s rows repeated to ``rows`` rows: a cache of that size with the same shapes and dtypes."""
    reps = -(-rows // len(cache))
    return SideCache({k: v.repeat(reps, *[1] * (v.dim() - 1))[:rows].contiguous() for k, v in cache.tensors.items()})


def save_and_load(small: SideCache, path: Path, dev: str) -> dict:
    """Save (digest included), the digest alone, the memory-mapped load without and with the check."""
    _, save_s = _timed(lambda: save_kb_cache(path, small, KEY), dev)
    _, digest_s = _timed(lambda: tensor_digests({k: v.detach().cpu().contiguous() for k, v in small.tensors.items()}), dev)
    plain, load_s = _timed(lambda: load_kb_cache(path, KEY, verify=False), dev)
    del plain
    loaded, verified_s = _timed(lambda: load_kb_cache(path, KEY), dev)
    assert loaded is not None, f"{path}: the bench's own cache did not load"
    return {"loaded": loaded, "save_s": save_s, "digest_s": digest_s, "load_s": load_s, "verified_load_s": verified_s,
            "file_mib": path.stat().st_size / 2**20}


def run(a: argparse.Namespace) -> list[dict]:
    dev = a.device
    matcher = paper_matcher(dev).eval()
    kb_f = kb_features(a.sample_entities if a.cache_only else a.entities, dev)
    m_f, gold = mention_features(kb_f, a.mentions, dev, signal=a.signal)
    with torch.no_grad():
        full, rebuild_s = _timed(lambda f=kb_f: side_in_blocks(matcher, f, True, a.cache_block), dev)
        mentions = side_in_blocks(matcher, m_f, False, a.cache_block)
    del kb_f, m_f
    if a.cache_only:
        full = tiled(full, a.entities)
    rows, ref = [], None
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for dtype in a.dtypes:
            small, compress_s = _timed(lambda d=dtype: compress(full, d), dev)
            row = {"dtype": dtype, "mib": cache_bytes(small) / 2**20, "compress_s": compress_s, "rebuild_s": rebuild_s}
            row |= save_and_load(small, Path(tmp) / f"kb_cache-{dtype}.pt", dev)
            loaded = row.pop("loaded").to(dev)  # CPU: no copy, still memory-mapped
            if not a.cache_only:
                res, rank_s = _timed(lambda c=loaded: exact_ranks(matcher, mentions, gold, c, mention_chunk=a.mention_chunk,
                                                                  max_pair_elements=a.max_pair_elements, bf16=a.bf16), dev)
                ref = res if ref is None else ref
                row |= {"mentions_s": a.mentions / rank_s, "same": 100.0 * (res.rank == ref.rank).double().mean().item(),
                        "max_diff": int((res.rank - ref.rank).abs().max()),
                        "top1_diff": float((res.top_scores[:, 0] - ref.top_scores[:, 0]).abs().max()),
                        "top1_range": (float(ref.top_scores[:, 0].min()), float(ref.top_scores[:, 0].max()))}
            rows.append(row)
            del small, loaded
            (Path(tmp) / f"kb_cache-{dtype}.pt").unlink()  # one cache on disk at a time (GiB at WikiMEL size)
    return rows


def print_digest_costs(rows: list[dict]) -> None:
    print(f"{'dtype':<10}{'file MiB':>10}{'save s':>8}{'digest s':>10}{'mmap load s':>12}{'+ verify s':>11}{'verify x':>10}"
          f"{'verify MiB/s':>13}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['file_mib']:>10.1f}{r['save_s']:>8.2f}{r['digest_s']:>10.2f}{r['load_s']:>12.3f}"
              f"{r['verified_load_s']:>11.2f}{r['verified_load_s'] / max(r['load_s'], 1e-9):>9.0f}x"
              f"{r['file_mib'] / max(r['verified_load_s'], 1e-9):>13.0f}")


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
    p.add_argument("--cache-only", action="store_true",
                   help="no scoring: tile the cache of --sample-entities rows to --entities rows, time size, save and load")
    p.add_argument("--sample-entities", type=int, default=256, help="entities encoded for --cache-only")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"device={a.device} threads={torch.get_num_threads()} load-average={os.getloadavg()[0]:.1f} "
          f"KB={a.entities} entities, {a.mentions} mentions; paper-size matcher, "
          + ("cache save/load only" if a.cache_only else "exact scoring"))
    rows = run(a)
    ref = rows[0]
    if a.cache_only:
        print_digest_costs(rows)
        print(f"a cache of {a.entities} entities tiled from {a.sample_entities} encoded ones; "
              f"load-average at the end {os.getloadavg()[0]:.1f}")
        return
    print(f"{'dtype':<10}{'cache MiB':>10}{'vs ' + ref['dtype']:>12}{'compress s':>11}"
          f"{'mentions/s':>11}{'same rank %':>12}{'max |Δrank|':>12}{'max |Δtop-1 score|':>19}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['mib']:>10.1f}{r['mib'] / ref['mib']:>11.2f}x{r['compress_s']:>11.2f}"
              f"{r['mentions_s']:>11.1f}{r['same']:>12.1f}{r['max_diff']:>12d}{r['top1_diff']:>19.2e}")
    print_digest_costs(rows)
    print(f"rebuilding the {ref['dtype']} cache from precomputed features (matcher.entity_side, no CLIP): "
          f"{ref['rebuild_s']:.2f} s; ranks and scores compared with the {ref['dtype']} cache's (best scores "
          f"{ref['top1_range'][0]:.2f} to {ref['top1_range'][1]:.2f}); load-average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
