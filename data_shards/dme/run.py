"""The DME command: fill each mention record's ``desc`` with the description its selector picks.

    python -m data_shards.dme --dataset synthetic --root DIR --candidates DIR/candidates.jsonl \\
        --backend embedding|llm|first|none --out OUTDIR [--splits train dev test] [--config dme.yaml] [--set key=value]

Reads the split files of ``--root`` (raw JSON lists; every field of every record, ``nil`` ones
included, is kept as it is except ``desc``), writes files of the same names into OUTDIR (each
complete under a temporary name, then renamed) and ``OUTDIR/dme_report.json``. Selections are
cached in ``OUTDIR/.dme_cache/choices.sqlite``: a re-run, or the rest of an interrupted run, only
asks the selector about what is not cached yet (fallbacks are never cached: a re-run asks again).
``python -m data_shards.convert --desc-from OUTDIR`` then builds shards with these descriptions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tqdm import tqdm

from core.atomic import atomic_write, write_text_atomic
from core.cli import disk_full_line
from data_shards import reader
from data_shards.dme.backends import Choice, LLMUnreachable, Query, Selector, make_selector
from data_shards.dme.cache import ChoiceCache, cache_key
from data_shards.dme.candidates import CandidateTable
from data_shards.dme.config import BACKENDS, DMEConfig, DMEConfigError, config_dict, load_dme_config
from data_shards.reader import SPLITS, DatasetFormatError

REPORT = "dme_report.json"
CACHE = Path(".dme_cache") / "choices.sqlite"


@dataclass
class SplitStats:
    file: str = ""
    records: int = 0
    with_candidates: int = 0
    no_candidates: int = 0  # desc left empty
    single_candidate: int = 0  # taken without asking the selector
    exact_match: int = 0  # mentions whose candidates came from a label/alias match
    fuzzy_match: int = 0
    asked: int = 0  # queries sent to the selector in this run
    cached: int = 0  # answered from the cache
    selected: int = 0  # decided by the selector (asked or cached)
    undecided: Counter = field(default_factory=Counter)  # reason -> count (fallback used)
    fallback_used: int = 0
    empty_desc: int = 0  # records written with desc ""
    undecided_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["undecided"] = dict(sorted(self.undecided.items()))
        d["seconds"] = round(self.seconds, 3)
        return d


def _query(rec: Any, index: int, path: Path) -> tuple[str, str]:
    if not isinstance(rec, dict):
        raise DatasetFormatError(f"{path}: record {index} is a {type(rec).__name__}, expected an object")
    for key in ("mentions", "sentence"):
        if not isinstance(rec.get(key), str):
            raise DatasetFormatError(f"{path}: record {index} (id {rec.get('id')!r}) has no string {key!r} field")
    return unquote(rec["mentions"]), rec["sentence"]


def enhance_records(records: list[dict], path: Path, table: CandidateTable, selector: Selector, cache: ChoiceCache,
                    cfg: DMEConfig, progress: bool = False, desc: str = "") -> SplitStats:
    """Set ``desc`` of every record in place and return the split's statistics.

    Only ``mentions`` and ``sentence`` are read (never ``answer``). Work goes in batches of
    ``cfg.batch``; each batch's new selections are committed to the cache before the next starts."""
    st = SplitStats(file=path.name, records=len(records))
    start = time.perf_counter()
    use_cache = not selector.trivial
    bar = tqdm(total=len(records), desc=desc or path.name, unit="mention", disable=not progress, mininterval=0.5)
    try:
        for lo in range(0, len(records), cfg.batch):
            batch = records[lo:lo + cfg.batch]
            todo: list[tuple[dict, Query, str]] = []  # (record, query, cache key)
            for i, rec in enumerate(batch, lo):
                mention, sentence = _query(rec, i, path)
                cands = table.lookup(mention)
                if not cands:
                    st.no_candidates += 1
                    rec["desc"] = ""
                    continue
                st.with_candidates += 1
                if cands[0].match == "fuzzy":
                    st.fuzzy_match += 1
                else:
                    st.exact_match += 1
                if len(cands) == 1 and cfg.backend != "none":
                    st.single_candidate += 1
                    rec["desc"] = cands[0].description
                    continue
                q = Query(mention, sentence, tuple(cands))
                todo.append((rec, q, cache_key(selector.identity(), mention, sentence, cands) if use_cache else ""))
            known = cache.get_many(k for _, _, k in todo) if use_cache else {}
            ask = [(rec, q, k) for rec, q, k in todo if k not in known]
            answers = selector.select([q for _, q, _ in ask]) if ask else []
            st.asked += len(ask)
            if use_cache:
                cache.put_many((k, c.index, c.reason) for (_, _, k), c in zip(ask, answers, strict=True) if c.cacheable)
            fresh = {id(rec): c for (rec, _, _), c in zip(ask, answers, strict=True)}
            for rec, q, k in todo:
                if k in known:
                    st.cached += 1
                    choice = Choice(*known[k])
                else:
                    choice = fresh[id(rec)]
                rec["desc"] = _apply(choice, q, st, cfg.fallback)
            bar.update(len(batch))
    finally:
        bar.close()
        st.seconds = time.perf_counter() - start
    st.empty_desc = sum(1 for rec in records if not rec.get("desc"))
    return st


def _apply(choice: Choice, q: Query, st: SplitStats, fallback: str) -> str:
    if choice.index is not None and 0 <= choice.index < len(q.candidates):
        st.selected += 1
        return q.candidates[choice.index].description
    if not choice.reason:  # backend none: no description on purpose
        return ""
    st.undecided[choice.reason] += 1
    st.fallback_used += 1
    if len(st.undecided_examples) < 5:
        st.undecided_examples.append(f"{q.mention!r}: {choice.reason}: {choice.raw!r}")
    return q.candidates[0].description if fallback == "first" else ""


def write_json_list(path: Path, records: list[dict]) -> None:
    """Atomic: a temporary file in the same folder, renamed when complete (core/atomic.py)."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("[" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "]\n")


def run_dme(dataset: str | reader.DatasetLayout, root: Path, candidates: Path, out: Path, cfg: DMEConfig,
            splits: tuple[str, ...] = SPLITS, progress: bool = True) -> dict[str, Any]:
    """Enhance the splits of ``root`` into ``out``; returns the report (also written to out/dme_report.json)."""
    started = time.perf_counter()
    root, out = Path(root), Path(out)
    if out.resolve() == root.resolve():
        raise ValueError(f"--out {out} is the dataset folder itself: choose another folder (the originals stay untouched)")
    lay = reader.layout(dataset)
    paths = {sp: reader.split_path(root, lay, sp) for sp in splits}  # fail early on a missing split
    table = CandidateTable.load(candidates, cfg.candidates)
    out.mkdir(parents=True, exist_ok=True)
    load_start = time.perf_counter()
    selector = make_selector(cfg)
    selector_load = time.perf_counter() - load_start
    cache = ChoiceCache(out / CACHE if cfg.cache and not selector.trivial else None)
    report: dict[str, Any] = {
        "dataset": lay.name, "root": str(root.resolve()), "backend": cfg.backend, "model": selector.model,
        "selector": selector.identity(), "fallback": cfg.fallback,
        "candidates": {"path": str(Path(candidates).resolve()), "rows": len(table),
                       "skipped_no_description": table.skipped_no_description, "labels": len(table.by_label.map),
                       "load_seconds": round(table.load_seconds, 3)},
        "config": config_dict(cfg), "splits": {},
    }
    try:
        for sp, path in paths.items():
            records = [rec for _, rec in reader.iter_json_array(path)]
            st = enhance_records(records, path, table, selector, cache, cfg, progress, desc=f"DME {sp}")
            write_json_list(out / path.name, records)
            report["splits"][sp] = st.as_dict()
        report["cache"] = {"path": str(CACHE) if cache.path else None, "entries": len(cache)}
    finally:
        selector.close()
        cache.close()
    report["timings"] = {"total_seconds": round(time.perf_counter() - started, 3),
                         "selector_load_seconds": round(selector_load, 3),
                         "fuzzy_index_seconds": round(table.fuzzy_index_seconds, 3),
                         "splits_seconds": {sp: s["seconds"] for sp, s in report["splits"].items()}}
    if hasattr(selector, "requests"):
        report["llm"] = {"url": selector.url, "requests": selector.requests, "replies": selector.succeeded}
    write_text_atomic(out / REPORT, json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_shards.dme",
                                description="Description-aware mention enhancement: fill each mention's desc.")
    p.add_argument("--dataset", default="auto", choices=["auto", *sorted(reader.LAYOUTS)],
                   help="a known dataset, or auto: the one <prefix>_{train,dev,test}.json family in --root (default)")
    p.add_argument("--split-files", default=None, metavar="PATTERN", help="split file names, e.g. 'MyArt_{split}.json'")
    p.add_argument("--root", required=True, type=Path, help="dataset folder holding the split files")
    p.add_argument("--candidates", type=Path, default=None, help="JSONL table {qid, label, aliases, description} "
                   "(default: ROOT/candidates.jsonl)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="overrides the config's backend")
    p.add_argument("--out", required=True, type=Path, help="folder for the enhanced split files and dme_report.json")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--config", type=Path, default=None, help="YAML file of DME settings")
    p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. llm.model=qwen2.5-7b-instruct (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the selection cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    overrides = list(a.sets) + ([f"backend={a.backend}"] if a.backend else []) + (["cache=false"] if a.no_cache else [])
    try:
        cfg = load_dme_config(a.config, overrides)
        lay = reader.resolve_layout(a.dataset, a.root, a.split_files)
        report = run_dme(lay, a.root, a.candidates or a.root / "candidates.jsonl", a.out, cfg, tuple(a.splits),
                         progress=not a.quiet)
    except (DMEConfigError, DatasetFormatError, FileNotFoundError, LLMUnreachable, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished selections are cached; no output file was left half-written", file=sys.stderr)
        return 130
    except OSError as err:
        line = disk_full_line(err, a.out)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    print(f"wrote {a.out}/{REPORT} (backend {report['backend']}, model {report['model'] or '-'}):")
    for sp, s in report["splits"].items():
        und = ", ".join(f"{k} {v}" for k, v in s["undecided"].items()) or "none"
        print(f"  {sp}: {s['records']} records, {s['with_candidates']} with candidates ({s['fuzzy_match']} fuzzy), "
              f"{s['no_candidates']} without, {s['single_candidate']} single, {s['selected']} selected "
              f"({s['cached']} cached), undecided: {und}; {s['seconds']:.1f}s")
    failed = all_fell_back(report)
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 3
    return 0


def all_fell_back(report: dict[str, Any]) -> str:
    """A message when the selector decided nothing and every query it was given fell back, else ""."""
    splits = report["splits"].values()
    fell_back = sum(s["fallback_used"] for s in splits)
    if fell_back == 0 or any(s["selected"] for s in splits):
        return ""
    reasons: Counter = Counter()
    for s in splits:
        reasons.update(s["undecided"])
    return (f"every one of the {fell_back} queries fell back ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}): "
            f"the files hold fallback descriptions only. Check the selector (llm.base_url, llm.model, llm.timeout_s).")
