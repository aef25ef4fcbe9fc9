"""Hard-negative mining time on a large synthetic KB, exact (flat) vs IVF index, same run.

    python -m bench.bench_mining [--preset million] [--work data/bench-mining] [--config launch/configs/synthetic.yaml]

Generates the synthetic preset (1,000,000 entities, no KB images) and converts it once (both are
reused on later runs), builds the demo model (random init: mining time does not depend on the
weights) and mines the training split: KB encoding, index build and search are timed separately,
for the exact flat index and for IVF; prints the times, the IVF/flat search ratio and the overlap
of IVF's neighbour lists with the exact ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from data_shards.collate import load_tokenizer
from data_shards.convert import ConvertSettings, convert
from data_shards.folder import ShardFolder
from data_shards.synthetic import generate, preset
from eval.encode import encode_kb, encode_split
from eval.ranking import build_index
from model.config import load_config
from model.factory import make_collator
from model.mmoe import build_model
from train.negatives import nearest_negatives


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="million")
    p.add_argument("--work", type=Path, default=Path("data/bench-mining"))
    p.add_argument("--config", default="launch/configs/synthetic.yaml")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--batch", type=int, default=512)
    a = p.parse_args()
    raw, shards = a.work / "raw", a.work / "shards"
    t = time.perf_counter()
    if not (raw / "generation.json").is_file():
        generate(raw, preset(a.preset), progress=True)
    if not (shards / "manifest.json").is_file():
        cfg0 = load_config(a.config)
        convert("synthetic", raw, shards, ConvertSettings(image_size=cfg0.model.tiny_clip.image_size, shard_size=10000))
    print(f"data ready in {time.perf_counter() - t:.0f}s (reused if present)")
    cfg = load_config(a.config, [f"data.shards={shards}", f"eval.batch_size={a.batch}", "eval.num_workers=1"])
    torch.manual_seed(0)
    model, cfg = build_model(cfg, load_tokenizer(shards / "tokenizer"))
    model.eval()
    collator = make_collator(cfg, model)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    kb = encode_kb(model, ShardFolder(shards), collator, device, batch_size=a.batch, num_workers=1, distributed=False)
    t_kb = time.perf_counter() - t0
    kb_vecs = model.matcher.separable_vectors(kb)
    del kb
    ms, ids = encode_split(model, ShardFolder(shards), "train", collator, device, batch_size=a.batch, num_workers=1,
                           distributed=False)
    m_vecs, gold = model.matcher.separable_vectors(ms), ids["gold_id"].numpy()
    rows = {}
    for kind in ("flat", "ivf"):
        t1 = time.perf_counter()
        index = build_index(kb_vecs, kind)
        t2 = time.perf_counter()
        table = nearest_negatives(m_vecs, index, gold, a.top_k)
        rows[kind] = (t2 - t1, time.perf_counter() - t2, table)
    overlap = np.mean([len(set(f) & set(i)) / a.top_k for f, i in zip(rows["flat"][2], rows["ivf"][2], strict=True)])
    print(f"KB {len(kb_vecs):,} entities x {kb_vecs.shape[1]} dims, {len(gold):,} training mentions, top-{a.top_k}")
    print(f"encode KB: {t_kb:.1f}s ({len(kb_vecs) / t_kb:,.0f} entities/s), threads={torch.get_num_threads()}")
    for kind, (build_s, search_s, _) in rows.items():
        print(f"{kind:>5}: index build {build_s:6.1f}s  search {search_s:6.1f}s  total mining {t_kb + build_s + search_s:6.1f}s")
    flat_s = rows["flat"][0] + rows["flat"][1]
    ivf_s = rows["ivf"][0] + rows["ivf"][1]
    print(f"index+search time flat/ivf: {flat_s / ivf_s:.2f}x; IVF neighbour overlap with exact: {100 * overlap:.1f}%")


if __name__ == "__main__":
    main()
