"""The cost of a large KB: one trained model ranked against KBs of growing size, stage by stage.

    python -m bench.bench_scale --work DIR [--sizes 2000,20000,200000,1000000] [--nproc 2]
                                [--memory-max 1000000] [--int8-max 1000000] [--exact-max 20000]
                                [--paper-entities 110000]

1. Data: the demo benchmark at 32 px (data_shards.synthetic, preset demo, image_size 32), generated once per
   size with ``extra_entities`` = size - 2000: the same 2000 entities, mentions and tokenizer at every size,
   plus KB-only distractors (data_shards/synthetic/world.py: ExtraEntities), converted at 32 px.
2. Model: the demo-size model (launch/configs/synthetic.yaml at 32 px, mined negatives) trained once on the
   2000-entity KB with the deepspeed launcher on ``--nproc`` processes.
3. Evaluation of the test split at every size with ``--nproc`` processes (eval.evaluate, the real command):
   two-stage with the KB sharded across the ranks (the default), timed per stage; then, up to
   ``--memory-max`` entities, the same gathered and both with an int8 cache, for the peak resident memory
   per process (beyond it, or beyond ``--int8-max`` for the int8 variants, the cache bytes are computed from
   the bytes per entity of the largest size measured: they are the same at every size);
   exact mode too up to ``--exact-max`` entities.
4. With ``--paper-entities``, the paper-size matcher (bench_eval's random features) two-stage at that size,
   one process, for comparison (not in the fit).
5. Output: the table on stdout and in DIR/scale.md, the figures in DIR/scale.json, and DIR/scale.png: each
   stage's seconds against the KB size, log-log, with a least-squares line per stage whose slope (the
   exponent: 1 = linear in the KB) the table prints too.

Steps already done in DIR (raw data, shards, the trained model, an evaluation's results) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from eval.ranking import index_kind
from eval.sharded import KBShard

ROOT = Path(__file__).resolve().parents[1]
BASE_ENTITIES = 2000  # the demo preset's KB: the mentions' world
IMAGE = 32  # pixels: generation, conversion and the model's image size
MODEL_SETTINGS = ["model.tiny_clip.image_size=32", "model.tiny_clip.patch_size=8"]
STAGES = ("cache_s", "index_s", "search_s", "rerank_s")
STAGE_NAMES = {"cache_s": "cache build", "index_s": "index build", "search_s": "search", "rerank_s": "re-rank"}
VARIANTS = (("sharded", "float32"), ("gathered", "float32"), ("sharded", "int8"), ("gathered", "int8"))


KILLED = ("Signal 9 (SIGKILL)", "exitcode: -9")  # torchrun's report of a rank the kernel's OOM killer stopped


def _run(cmd: list[str], log: Path, env: dict | None = None, may_be_killed: bool = False) -> float | None:
    """Run ``cmd`` with its output in ``log``; its wall seconds. A failure stops the bench with the log's end,
    except, with ``may_be_killed``, a process killed by SIGKILL (out of memory): then None."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        text = log.read_text()
        if may_be_killed and (proc.returncode in (-9, 137) or any(k in text for k in KILLED)):
            return None
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    return time.perf_counter() - t0


def _env(nproc: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))


def _port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def data(work: Path, size: int) -> tuple[Path, dict]:
    """Shards of the demo benchmark grown to ``size`` entities, and the seconds generation and conversion took."""
    raw, shards, seconds = work / f"raw-{size}", work / f"shards-{size}", {}
    if not (raw / "generation.json").is_file():
        seconds["generate_s"] = _run([sys.executable, "-m", "data_shards.synthetic", "--out", str(raw), "--preset", "demo",
                                      "--set", f"image_size={IMAGE}", "--set", f"extra_entities={size - BASE_ENTITIES}",
                                      "--quiet", "--overwrite"], work / "logs" / f"generate-{size}.log")
    if not (shards / "manifest.json").is_file():
        seconds["convert_s"] = _run([sys.executable, "-m", "data_shards.convert", "--dataset", "synthetic", "--root",
                                     str(raw), "--out", str(shards), "--image-size", str(IMAGE)],
                                    work / "logs" / f"convert-{size}.log")
    return shards, seconds


def train(work: Path, shards: Path, nproc: int) -> Path:
    """The demo-size model trained on the base KB (reused when DIR/runs/scale/best exists)."""
    best = work / "runs" / "scale" / "best"
    if not (best / "model.safetensors").is_file():
        settings = [f"data.shards={shards}", f"train.out_dir={work / 'runs'}", "train.run_name=scale", *MODEL_SETTINGS]
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", _port(), "launch/train.py", "--config",
               "launch/configs/synthetic.yaml", "--resume", "auto"] + [x for s in settings for x in ("--set", s)]
        _run(cmd, work / "logs" / "train.log", _env(nproc))
    return best


def evaluate(work: Path, best: Path, shards: Path, size: int, nproc: int, mode: str, sharding: str, dtype: str,
             may_be_killed: bool = False) -> dict | None:
    """results-test.json of one evaluation (reused when present); None when, with ``may_be_killed``, a rank was
    killed for memory (recorded in the folder's killed.txt, so a rerun does not try again)."""
    out = work / "eval" / f"{size}-{mode}-{sharding}-{dtype}"
    if (out / "killed.txt").is_file():
        return None
    if not (out / "results-test.json").is_file():
        launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}"]
                    if nproc > 1 else [sys.executable])
        settings = [f"data.shards={shards}", f"eval.kb_sharding={sharding}", f"eval.cache_dtype={dtype}",
                    "eval.save_kb_cache=false", "eval.recall_at=[10,100]"]
        cmd = [*launcher, "-m", "eval.evaluate", "--checkpoint", str(best), "--split", "test", "--mode", mode,
               "--allow-other-kb", "--out", str(out)] + [x for s in settings for x in ("--set", s)]
        if _run(cmd, work / "logs" / f"eval-{out.name}.log", _env(nproc), may_be_killed) is None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "killed.txt").write_text("a rank was killed by SIGKILL (out of memory) during this evaluation\n")
            return None
    return json.loads((out / "results-test.json").read_text())


def paper_row(work: Path, entities: int) -> dict:
    """bench_eval's two-stage variant at the paper's sizes on random features (one process)."""
    path = work / f"paper-{entities}.json"
    if not path.is_file():
        log = work / "logs" / f"paper-{entities}.log"
        _run([sys.executable, "-m", "bench.bench_eval", "--variant", "two-stage", "--entities", str(entities),
              "--mentions", "600", "--device", "cpu"], log)
        path.write_text(log.read_text().strip().splitlines()[-1])
    r = json.loads(path.read_text())
    t = r["times"]  # bench_eval's two-stage variant builds a flat index (eval.ranking.kb_index's default)
    return {"entities": entities, "index": "flat", "cache_s": t["cache_s"], "index_s": t["index_s"], "search_s": t["search_s"],
            "rerank_s": t["rerank_s"], "cache_bytes": r["saved_cache"]["bytes"], **r["recall"]}


def row(size: int, runs: dict, nproc: int, per_entity: dict[str, float]) -> dict:
    """One size's figures from its evaluations: stages from the sharded fp32 run, memory from every variant run,
    cache bytes per rank of the variants not run computed from the bytes per entity (``per_entity``: cache bytes
    per entity by dtype, updated from these runs and kept for the next sizes)."""
    main = runs[("two-stage", "sharded", "float32")]
    t = main["timings"]
    out = {"entities": size, "index": index_kind(main["settings"]["eval"]["index"], size), "cache_s": t["encode_kb_s"],
           "index_s": t["index_s"], "search_s": t["search_s"], "rerank_s": t["rerank_s"],
           "H@1": main["metrics"]["H@1"], "MRR": main["metrics"]["MRR"],
           "recall@10": main["metrics"]["recall@10"], "recall@100": main["metrics"]["recall@100"]}
    for (mode, sharding, dtype), r in runs.items():
        if r is None:  # killed for memory: the cache bytes come from the bytes per entity, the peak is "killed"
            out[f"peak_rss_{sharding}_{dtype}"] = None
        elif mode == "two-stage":
            per_entity[dtype] = sum(r["kb_cache"]["bytes_per_rank"]) / (size * (nproc if sharding == "gathered" else 1))
            out[f"peak_rss_{sharding}_{dtype}"] = max(r["peak_rss_bytes_per_rank"])
    largest = max(b - a for a, b in _ranges(size, nproc))
    for sharding, dtype in VARIANTS:
        if dtype in per_entity:
            out[f"cache_{sharding}_{dtype}"] = per_entity[dtype] * (size if sharding == "gathered" else largest)
    if ("exact", "sharded", "float32") in runs:
        m = runs[("exact", "sharded", "float32")]["metrics"]
        out.update({"exact_H@1": m["H@1"], "exact_MRR": m["MRR"]})
    return out


def _ranges(size: int, nproc: int) -> tuple[tuple[int, int], ...]:
    return KBShard.of(size, nproc, 0).ranges


INDEX_STAGES = ("index_s", "search_s")  # their cost depends on the index kind: fitted over the smallest size's kind


def _fit_points(rows: list[dict], stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(KB sizes, seconds) a stage's fit is made over: the index build and the search only at the sizes whose
    index kind is the smallest size's."""
    if stage in INDEX_STAGES and rows:
        rows = [r for r in rows if r.get("index") == rows[0].get("index")]
    pts = [(r["entities"], r[stage]) for r in rows if r.get(stage, 0) > 0]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def exponents(rows: list[dict]) -> dict[str, float]:
    """Least-squares slope of log(seconds) against log(KB size), per stage (1.0: linear in the KB); the index
    build and the search over the sizes with the smallest size's index kind (flat and IVF differ in kind)."""
    out = {}
    for stage in STAGES:
        x, y = _fit_points(rows, stage)
        if len(x) >= 2:
            out[stage] = float(np.polyfit(np.log(x), np.log(y), 1)[0])
    return out


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _rss(r: dict, key: str) -> str:
    if key in r and r[key] is None:
        return f"killed (OOM, {_total_ram() / 2**30:.1f} GiB machine)"
    return _mib(r.get(key))


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def table(rows: list[dict], fits: dict[str, float], paper: dict | None, nproc: int) -> str:
    lines = ["| entities | first stage | cache build s | index s | search s | re-rank s | recall@10 | recall@100 | H@1 | MRR "
             "| exact H@1 / MRR | cache MiB per rank: gathered fp32 / sharded fp32 / gathered int8 / sharded int8 "
             "| peak RSS MiB per rank: gathered / sharded (fp32) |",
             "|" + "---|" * 13]
    for r in rows:
        exact = f"{r['exact_H@1']:.2f} / {r['exact_MRR']:.2f}" if "exact_H@1" in r else "-"
        cache = " / ".join(_mib(r.get(f"cache_{s}_{d}")) for s, d in (VARIANTS[1], VARIANTS[0], VARIANTS[3], VARIANTS[2]))
        rss = f"{_rss(r, 'peak_rss_gathered_float32')} / {_rss(r, 'peak_rss_sharded_float32')}"
        lines.append(f"| {r['entities']:,} | {r.get('index', '-')} | {r['cache_s']:.1f} | {r['index_s']:.2f} "
                     f"| {r['search_s']:.2f} "
                     f"| {r['rerank_s']:.2f} | {r['recall@10']:.1f} | {r['recall@100']:.1f} | {r['H@1']:.2f} "
                     f"| {r['MRR']:.2f} | {exact} | {cache} | {rss} |")
    kind = rows[0].get("index", "-") if rows else "-"
    lines.append(f"| exponent (fit; index and search: {kind} sizes) | | "
                 + " | ".join(f"{fits[s]:.2f}" if s in fits else "-" for s in STAGES) + " |" + " |" * 7)
    if paper:
        sharded = paper["cache_bytes"] / nproc
        lines.append(f"| {paper['entities']:,} paper-size matcher, random features, 1 process | {paper.get('index', '-')} "
                     f"| {paper['cache_s']:.1f} "
                     f"| {paper['index_s']:.2f} | {paper['search_s']:.2f} | {paper['rerank_s']:.2f} | {paper['recall@10']:.1f} "
                     f"| {paper['recall@100']:.1f} | - | - | - | {_mib(paper['cache_bytes'])} / {_mib(sharded)} (fp32) | - |")
    return "\n".join(lines)


def plot(rows: list[dict], fits: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for stage in STAGES:
        pts = [(r["entities"], r[stage]) for r in rows if r.get(stage, 0) > 0]
        if not pts:
            continue
        x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        line = ax.loglog(x, y, "o-", label=f"{STAGE_NAMES[stage]} (slope {fits.get(stage, float('nan')):.2f})")[0]
        if stage in fits:
            x, y = _fit_points(rows, stage)
            b = np.polyfit(np.log(x), np.log(y), 1)
            ax.loglog(x, np.exp(np.polyval(b, np.log(x))), "--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("KB entities")
    ax.set_ylabel("seconds")
    kinds = ", ".join(f"{r['index']} at {r['entities']:,}" for r in rows if "index" in r)
    ax.set_title(f"Two-stage evaluation cost against the KB size (dashed: least-squares fit)\nfirst stage: {kinds}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the data, the model and the results (reused)")
    p.add_argument("--sizes", default="2000,20000,200000,1000000", help="KB sizes, comma-separated (>= 2000)")
    p.add_argument("--nproc", type=int, default=2, help="processes for training and evaluation")
    p.add_argument("--memory-max", type=int, default=1_000_000, help="largest KB evaluated in every variant (memory)")
    p.add_argument("--int8-max", type=int, default=1_000_000, help="largest KB evaluated with an int8 cache")
    p.add_argument("--exact-max", type=int, default=20_000, help="largest KB also evaluated in exact mode")
    p.add_argument("--paper-entities", type=int, default=0, help="also the paper-size matcher at this KB size (0: no)")
    a = p.parse_args(argv)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    if sizes[0] < BASE_ENTITIES:
        p.error(f"--sizes: every KB holds the {BASE_ENTITIES} entities of the mentions' world")
    a.work.mkdir(parents=True, exist_ok=True)
    base, data_s = data(a.work, BASE_ENTITIES)
    best = train(a.work, base, a.nproc)
    rows, prep, per_entity = [], {BASE_ENTITIES: data_s}, {}
    for size in sizes:
        shards, prep[size] = data(a.work, size)
        runs = {}
        variants = VARIANTS if size <= a.memory_max else VARIANTS[:1]
        variants = [v for v in variants if v[1] != "int8" or size <= a.int8_max]
        for sharding, dtype in variants:
            runs[("two-stage", sharding, dtype)] = evaluate(a.work, best, shards, size, a.nproc, "two-stage", sharding,
                                                            dtype, may_be_killed=(sharding, dtype) != VARIANTS[0])
        if size <= a.exact_max:
            runs[("exact", "sharded", "float32")] = evaluate(a.work, best, shards, size, a.nproc, "exact", "sharded", "float32")
        rows.append(row(size, runs, a.nproc, per_entity))
        print(f"[scale] {size:,} entities: {json.dumps(rows[-1])}", flush=True)
    fits = exponents(rows)
    paper = paper_row(a.work, a.paper_entities) if a.paper_entities else None
    text = table(rows, fits, paper, a.nproc)
    (a.work / "scale.md").write_text(text + "\n")
    (a.work / "scale.json").write_text(json.dumps({"rows": rows, "exponents": fits, "paper": paper, "nproc": a.nproc,
                                                   "data_seconds": prep, "cpu_count": os.cpu_count()}, indent=1))
    plot(rows, fits, a.work / "scale.png")
    print(text)
    print(f"plot: {a.work / 'scale.png'}")


if __name__ == "__main__":
    main()
