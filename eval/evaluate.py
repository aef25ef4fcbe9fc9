"""Evaluate a trained model on a split, ranking every mention's gold entity against the whole KB.

    python -m eval.evaluate --checkpoint runs/NAME/best [--config CFG] [--split test]
                            [--mode exact|two-stage] [--out DIR] [--set eval.top_k=200 ...]

Works as one process or under torchrun / the deepspeed launcher / accelerate launch: the KB
encoding and the mentions are split across ranks, the KB cache is gathered, rank 0 writes
  results-<split>.json       metrics (with the slices of eval/slices.py), first-stage recall@K (two-stage),
                             settings, checkpoint, dataset manifest hash, timings, the KB cache used
  per_mention-<split>.jsonl  mention id, gold, gold rank, ties, top-5 entity ids with scores, slice flags
  leaderboard-<split>.md     this run next to the published numbers for the dataset, then the slice table
and logs the leaderboard table to W&B when a run is active. :func:`evaluate_split` is what the
trainer calls for dev evaluation.

The entity cache is kept in ``eval.cache_dtype`` (eval/kb_cache.py). With ``eval.save_kb_cache`` the
command saves it next to the checkpoint as ``kb_cache-<key>.pt`` and reuses it (memory-mapped)
while its key (KB, weights, model and data config, precision, cache dtype) matches; the trainer's
dev evaluation keeps it in memory only.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from core.cli import disk_full_line
from data_shards.collate import Collator
from data_shards.folder import ShardFolder
from data_shards.store import ShardError
from eval.encode import check_interrupt, encode_kb, encode_split
from eval.kb_cache import (
    CacheValueError,
    cache_bytes,
    cache_dtype_of,
    cache_key,
    cache_path,
    compress,
    load_kb_cache,
    save_kb_cache,
    slice_key,
)
from eval.leaderboard import leaderboard_markdown, leaderboard_rows
from eval.metrics import NonFiniteScoreError, summarize
from eval.ranking import LocalCandidates, autocast_for, exact_ranks, kb_index, recall_at, slice_align, two_stage_ranks
from eval.sharded import KBShard, ShardedCandidates, empty_like_rank0, shard_index, sharded_exact_ranks
from eval.slices import evaluation_slices, slice_rows, slices_line, slices_markdown
from model import distributed as D
from model.config import Config, to_dict
from model.export import load_export_for_command
from model.factory import make_collator
from model.mmoe import MMoEModel
from model.modes import eval_mode
from moe.features import SideCache


@dataclass
class EvalResult:
    split: str
    metrics: dict[str, float]
    per_mention: list[dict] = field(default_factory=list)  # filled on rank 0
    timings: dict[str, float] = field(default_factory=dict)
    kb_cache: dict = field(default_factory=dict)  # path (None: in memory only), state (built | reused), dtype, bytes
    peak_rss: list[int] = field(default_factory=list)  # bytes, per rank: the most resident memory so far
    # with keep_kb: this rank's entity cache and its kb_cache record, for another split of the same model
    entities: tuple[SideCache, dict] | None = field(default=None, repr=False, compare=False)


def kb_cache_location(checkpoint: str | Path, cfg: Config, device: torch.device) -> tuple[Path, str]:
    """Path and key of the saved entity cache of this export under ``cfg`` on ``device``."""
    autocast = isinstance(autocast_for(device, cfg.eval.bf16), torch.autocast)  # bf16 changes the numbers
    key = cache_key(checkpoint, cfg, autocast=autocast)
    return cache_path(checkpoint, key), key


def kb_shard(cfg: Config, model: MMoEModel) -> KBShard | None:
    """The KB slices the ranks hold under ``eval.kb_sharding: sharded``; None where every rank holds the whole
    KB: ``gathered``, one process, or ``compat: published`` (its entity blocks of 6,000 KB rows span slices)."""
    if cfg.eval.kb_sharding != "sharded" or D.world() == 1 or model.matcher.settings.published:
        return None
    return KBShard.of(ShardFolder.open(cfg.data.shards).shard_set("kb").total, D.world(), D.rank())


def _cache_info(kb: SideCache, path: Path | None, state: str, shard: KBShard | None) -> dict:
    """What an evaluation reports of its entity cache (rank 0's file and rows when sharded)."""
    info = {"path": None if path is None else str(path), "state": state, "dtype": cache_dtype_of(kb),
            "bytes": cache_bytes(kb), "sharding": "gathered" if shard is None else "sharded"}
    info["bytes_per_rank"] = D.gather_objects(info["bytes"]) if shard else [info["bytes"]] * D.world()
    if shard is not None:
        info["rows"] = [shard.start, shard.stop]
    return info


def entity_cache(model: MMoEModel, cfg: Config, split: str, device: torch.device, collator: Collator,
                 path: Path | None = None, key: str | None = None,
                 interrupt: Callable[[], bool] | None = None, shard: KBShard | None = None) -> tuple[SideCache, dict]:
    """The KB's entity cache in ``eval.cache_dtype`` and what was done: the one saved at ``path`` when
    its key is ``key``, else encoded, compressed and (with ``path``) saved by rank 0. With ``shard``
    (:func:`kb_shard`) each rank's own slice only, saved and reused per slice."""
    e = cfg.eval
    if path is not None and key is None:
        raise ValueError("a saved KB cache needs its key (eval.kb_cache.cache_key)")
    if shard is not None:
        return _sharded_entity_cache(model, cfg, split, device, collator, path, key, interrupt, shard)
    if path is not None:
        cache = load_kb_cache(path, key, warn=D.is_main())
        if all(D.gather_objects(cache is not None)):  # encoding the KB is collective: all ranks reuse, or none
            cache = cache.to(device)
            return cache, _cache_info(cache, path, "reused", None)
    # compat: published reproduces the published blocks (entity side on blocks of compat_entity_block KB
    # rows, mention side on batches of compat_mention_batch), on any number of processes; the blocking
    # happens inside encode_kb, the compression after it.
    block = e.compat_entity_block if model.matcher.settings.published else None
    kb = encode_kb(model, ShardFolder.open(cfg.data.shards), collator, device, block=block, batch_size=e.batch_size,
                   num_workers=e.num_workers, bf16=e.bf16, interrupt=interrupt)
    try:
        kb = compress(kb, e.cache_dtype)
    except CacheValueError as err:  # every rank holds the same gathered cache: all raise
        raise NonFiniteScoreError(f"evaluation of split {split!r}: {err}", []) from None
    saved = False
    if path is not None:
        saved = D.is_main() and save_kb_cache(path, kb, key, warn=True)  # a failed save costs the reuse only
        D.barrier()  # the file is complete before any rank goes on
    return kb, _cache_info(kb, path if saved else None, "built", None)


def _sharded_entity_cache(model: MMoEModel, cfg: Config, split: str, device: torch.device, collator: Collator,
                          path: Path | None, key: str | None, interrupt: Callable[[], bool] | None,
                          shard: KBShard) -> tuple[SideCache, dict]:
    """entity_cache of this rank's slice: its own file next to the checkpoint (kb_cache-KEY.rowsA-B.pt), reused
    when every rank's is; a rank whose slice is empty holds a cache of no rows and no file."""
    e = cfg.eval
    rows = (shard.start, shard.stop)
    has_rows = rows[0] < rows[1]
    file = None if path is None else cache_path(path.parent, key, rows)
    if file is not None:
        cache = load_kb_cache(file, slice_key(key, rows), warn=D.is_main() or file.exists()) if has_rows else None
        if all(D.gather_objects(cache is not None or not has_rows)):  # all ranks reuse, or none
            cache = empty_like_rank0(None if cache is None else cache.to(device), device)
            return cache, _cache_info(cache, file if has_rows else None, "reused", shard)
    kb, error = None, None
    try:  # stored in the cache dtype as encoded (eval/encode.py: RowWriter)
        kb = encode_kb(model, ShardFolder.open(cfg.data.shards), collator, device, batch_size=e.batch_size,
                       num_workers=e.num_workers, bf16=e.bf16, interrupt=interrupt, sharded=True, cache_dtype=e.cache_dtype)
    except CacheValueError as err:
        error = str(err)
    errors = [x for x in D.gather_objects(error) if x]  # one slice's bad value stops every rank
    if errors:
        raise NonFiniteScoreError(f"evaluation of split {split!r}: {errors[0]}", [])
    kb = empty_like_rank0(kb, device)
    saved = False
    if file is not None:
        saved = has_rows and save_kb_cache(file, kb, slice_key(key, rows), warn=True)
        D.barrier()
    return kb, _cache_info(kb, file if saved else None, "built", shard)


def evaluate_split(
    model: MMoEModel, cfg: Config, split: str, device: torch.device, collator: Collator | None = None,
    kb_cache_path: Path | None = None, cache_key: str | None = None, interrupt: Callable[[], bool] | None = None,
    entities: tuple[SideCache, dict] | None = None, keep_kb: bool = False,
) -> EvalResult:
    """Rank every mention of ``split`` against the whole KB; identical on any number of ranks.

    ``kb_cache_path`` and ``cache_key`` (:func:`kb_cache_location`): reuse the entity cache saved
    there, or save the one built; without them the cache is built in memory only (dev evaluation).
    ``interrupt`` (collective) is asked while encoding and between the stages; when it says stop, the
    evaluation raises eval.encode.Interrupted (the trainer's way to honour a stop signal in a long one).
    ``keep_kb``: the result keeps this rank's entity cache (``EvalResult.entities``); ``entities``: such a
    cache of an evaluation of the same weights under the same config, used instead of encoding the KB."""
    collator = collator or make_collator(cfg, model)
    with eval_mode(model):
        return _evaluate(model, cfg, split, device, collator, kb_cache_path, cache_key, interrupt, entities, keep_kb)


def _evaluate(model: MMoEModel, cfg: Config, split: str, device: torch.device, collator: Collator,
              kb_cache_path: Path | None, cache_key: str | None, interrupt: Callable[[], bool] | None,
              entities: tuple[SideCache, dict] | None = None, keep_kb: bool = False) -> EvalResult:
    e = cfg.eval
    folder = ShardFolder.open(cfg.data.shards)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    shard = kb_shard(cfg, model)
    if entities is not None:
        kb, kb_info = entities[0], {**entities[1], "state": "reused in memory"}
    else:
        kb, kb_info = entity_cache(model, cfg, split, device, collator, kb_cache_path, cache_key, interrupt, shard)
    kb_size = len(kb) if shard is None else shard.total
    check_interrupt(interrupt, f"evaluation of {split}: after the KB")
    timings["encode_kb_s"] = time.perf_counter() - t0
    compat = model.matcher.settings.published
    io = dict(batch_size=e.batch_size, num_workers=e.num_workers, bf16=e.bf16)
    t1 = time.perf_counter()
    mentions, m_ids = encode_split(model, folder, split, collator, device,
                                   block=e.compat_mention_batch if compat else None, interrupt=interrupt, **io)
    check_interrupt(interrupt, f"evaluation of {split}: after the mentions")
    timings["encode_mentions_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    gold = m_ids["gold_id"]
    extra: dict[str, float] = {}
    stages: dict[str, float] = {}
    bad: list[int] = []  # dataset indices of mentions with a non-finite score (this rank's)
    try:
        if e.mode == "exact" and shard is None:
            res = exact_ranks(model.matcher, mentions, gold, kb, mention_chunk=e.mention_chunk,
                              max_pair_elements=e.max_pair_elements, bf16=e.bf16, align=slice_align(kb_size, D.world()))
        elif e.mode == "exact":
            res = sharded_exact_ranks(model.matcher, mentions, gold, kb, shard, mention_chunk=e.mention_chunk,
                                      max_pair_elements=e.max_pair_elements, bf16=e.bf16)
        else:
            t_index = time.perf_counter()
            ivf = dict(nlist=e.ivf_lists, nprobe=e.nprobe)
            if shard is None:
                source = LocalCandidates(kb_index(model.matcher, kb, e.index, rows=len(mentions), **ivf), kb)
            else:
                source = ShardedCandidates(shard_index(model.matcher, kb, e.index, len(mentions), shard.total, **ivf),
                                           kb, shard)
            timings["index_s"] = time.perf_counter() - t_index
            res = two_stage_ranks(model.matcher, mentions, gold, kb, top_k=e.top_k, source=source, bf16=e.bf16,
                                  timings=stages)
            timings.update(search_s=stages["search_s"], rerank_s=stages["rerank_s"])
    except NonFiniteScoreError as err:
        bad = [int(m_ids["index"][r]) for r in err.rows]
    bad = sorted(i for part in D.gather_objects(bad) for i in part)  # every rank raises, or none
    if bad:
        ids = _mention_ids(folder, split)
        named = ", ".join(f"index {i} (id {ids.get(i)})" for i in bad[:3])
        raise NonFiniteScoreError(
            f"evaluation of split {split!r}: the model gives a NaN or infinite score for {len(bad)} mention(s), e.g. "
            f"{named}; no rank can be read from such scores (are the weights finite? a diverged run?)", bad)
    check_interrupt(interrupt, f"evaluation of {split}: after the ranking")
    if e.mode != "exact":
        recall_parts = D.gather_objects((len(gold), recall_at(source, model.matcher, mentions, gold, tuple(e.recall_at))))
        total = sum(n for n, _ in recall_parts)
        extra = {k: sum(n * r[k] for n, r in recall_parts) / total for k in recall_parts[0][1]}
    timings["rank_s"] = time.perf_counter() - t2
    gathered = {name: D.gather_rows(t.to(device)).cpu() for name, t in
                (("rank", res.rank), ("ties", res.ties), ("top_ids", res.top_ids), ("top_scores", res.top_scores),
                 ("index", m_ids["index"]), ("gold", gold))}
    metrics = summarize(gathered["rank"], gathered["ties"])
    metrics.update(extra)
    metrics["kb_size"] = kb_size
    timings["total_s"] = time.perf_counter() - t0
    metrics["mentions_per_s"] = metrics["mentions"] / max(timings["total_s"], 1e-9)
    per_mention = []
    if D.is_main():  # slices (seen/unseen gold, image, description, ties): rank 0 only, from the shards' text
        sliced, masks = evaluation_slices(folder, split, gathered["index"], gathered["rank"], gathered["ties"],
                                          use_desc=cfg.data.mention_desc, train_fraction=cfg.data.train_fraction,
                                          seed=cfg.data.seed, fraction_mode=cfg.data.train_fraction_mode)
        metrics.update(sliced)
        flags = {k: masks[k] for k in ("gold_seen", "image", "desc_is_kb") if k in masks}
        for i in range(len(gathered["rank"])):
            per_mention.append({
                "index": int(gathered["index"][i]), "gold": int(gathered["gold"][i]), "rank": int(gathered["rank"][i]),
                "ties": int(gathered["ties"][i]), "top_ids": gathered["top_ids"][i].tolist(),
                "top_scores": [round(float(s), 5) for s in gathered["top_scores"][i]],
            } | {k: bool(v[i]) for k, v in flags.items()})
    return EvalResult(split, metrics, per_mention, timings, kb_info, D.gather_objects(peak_rss_bytes()),
                      (kb, kb_info) if keep_kb else None)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (its DataLoader workers are processes of their own; pages
    of a memory-mapped cache count once they are read)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def verify_eval_data(cfg: Config, split: str) -> None:
    """Before an evaluation whose results cite the manifest: its split and KB shards must match it."""
    if cfg.eval.verify_checksums:
        ShardFolder.open(cfg.data.shards).verify(["kb", split], "set eval.verify_checksums=false to evaluate anyway",
                                                 rank=D.rank(), world=D.world(), gather=D.gather_objects)


def write_outputs(result: EvalResult, cfg: Config, out_dir: Path, checkpoint: str, run_name: str) -> Path:
    """Rank 0 writes the results JSON, the per-mention file and the leaderboard; returns the leaderboard path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = ShardFolder.open(cfg.data.shards)
    dataset = folder.dataset
    ids = _mention_ids(folder, result.split)
    with open(out_dir / f"per_mention-{result.split}.jsonl", "w") as fh:
        for rec in result.per_mention:
            fh.write(json.dumps({"mention_id": ids.get(rec["index"]), **rec}, allow_nan=False) + "\n")
    summary = {
        "dataset": dataset, "split": result.split, "checkpoint": str(checkpoint), "metrics": result.metrics,
        "settings": {"eval": to_dict(cfg.eval), "data": to_dict(cfg.data)}, "world_size": D.world(),
        "manifest_sha256": folder.sha256, "timings": result.timings, "kb_cache": result.kb_cache,
        "peak_rss_bytes_per_rank": result.peak_rss,
    }
    (out_dir / f"results-{result.split}.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    board = out_dir / f"leaderboard-{result.split}.md"
    slices = slices_markdown(result.metrics)  # a second table: what the headline number hides
    board.write_text(leaderboard_markdown(dataset, result.split, result.metrics, run_name) + ("\n" + slices if slices else ""))
    log_leaderboard_to_wandb(dataset, result.split, result.metrics, run_name)
    return board


def _mention_ids(shards: ShardFolder, split: str) -> dict[int, str]:
    """index -> the dataset's own mention id, read from the split's shards (text only)."""
    return {meta["index"]: meta["id"] for meta in shards.json_members(split)}


def log_leaderboard_to_wandb(dataset: str, split: str, metrics: dict[str, float], run_name: str) -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    table = wandb.Table(columns=["model", "H@1", "H@3", "H@5", "MRR", "MR", "source"],
                        data=leaderboard_rows(dataset, metrics, run_name))
    log = {f"leaderboard/{split}": table}
    if slice_rows(metrics):
        log[f"slices/{split}"] = wandb.Table(columns=["slice", "mentions", "H@1", "MRR"], data=slice_rows(metrics))
    wandb.log(log)


def cache_line(c: dict) -> str:
    """The entity cache an evaluation used, in one line."""
    where = c["path"] or "in memory only"
    if c.get("sharding") == "sharded":
        per_rank = "/".join(f"{b / 2**20:.1f}" for b in c["bytes_per_rank"])
        return (f"entity cache {c['state']}, sharded over {len(c['bytes_per_rank'])} ranks ({c['dtype']}, {per_rank} MiB "
                f"per rank): rank 0's rows {c['rows'][0]}-{c['rows'][1]} {where}")
    return f"entity cache {c['state']} ({c['dtype']}, {c['bytes'] / 2**20:.1f} MiB): {where}"


def one_line(result: EvalResult) -> str:
    m = result.metrics
    line = (f"[eval {result.split}] H@1 {m['H@1']:.2f}  H@3 {m['H@3']:.2f}  H@5 {m['H@5']:.2f}  MRR {m['MRR']:.2f}  "
            f"MR {m['MR']:.1f}  ({int(m['mentions'])} mentions x {int(m['kb_size'])} entities, "
            f"{m['mentions_per_s']:.1f} mentions/s, ties {m['ties_total']})")
    for k in sorted(k for k in m if k.startswith("recall@")):
        line += f"  {k} {m[k]:.1f}"
    if slices_line(m):
        line += "  | " + slices_line(m)
    return line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Rank every mention of a split against the whole KB and report leaderboard metrics.")
    p.add_argument("--checkpoint", required=True, help="model export folder (runs/NAME/best) with model.safetensors")
    p.add_argument("--config", help="YAML whose data/eval sections replace the export's (the model section is the export's)")
    p.add_argument("--split", default="test")
    p.add_argument("--mode", choices=["exact", "two-stage"])
    p.add_argument("--out", type=Path, help="output folder (default: the checkpoint folder)")
    p.add_argument("--name", default="this run", help="row name in the leaderboard")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--allow-other-kb", action="store_true",
                   help="evaluate on a KB other than the one the export was trained on (the tokenizer must still match)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    D.init_process_group()
    out = a.out or Path(a.checkpoint)
    try:
        run(a, out)
    except COMMAND_ERRORS as err:
        line = error_line(err, out)
    else:
        D.shutdown()
        return
    exit_with(line)


# What a command reports in one line (error_line) instead of a traceback; eval.link uses them too.
# ConfigError, ExportError, DataMismatch, NonFiniteScoreError and CacheValueError are ValueErrors.
COMMAND_ERRORS = (ValueError, KeyError, ShardError, OSError)


def exit_with(line: str) -> NoReturn:
    """Exit with ``line``; call it after the ``except`` block, once the exception is gone: its frames may
    have held a DataLoader iterator, whose workers then end cleanly here rather than being killed at exit
    (which makes torch print a traceback)."""
    gc.collect()  # the frames of a traceback form cycles
    sys.exit(line)


def error_line(err: BaseException, out: Path | None = None) -> str:
    """``err`` as the command's last words: the message alone (without the traceback of the DataLoader
    worker that raised it), and a full disk said as such with the folder it hit (``out`` when the
    error names no file)."""
    full = disk_full_line(err, out, then="free space there, or write elsewhere (--out)")
    if full:
        return full
    msg = str(err)
    if "Original Traceback" in msg:  # torch re-raises a worker's error with its traceback before the message
        msg = msg.rstrip().rsplit(f"{type(err).__name__}: ", 1)[-1]
    return f"error: {msg}"


def run(a: argparse.Namespace, out: Path) -> None:
    """eval.evaluate's work once its arguments are parsed: load, verify, evaluate, write (rank 0)."""
    device = D.device_for_rank()
    settings = ([f"eval.mode={a.mode}"] if a.mode else []) + a.overrides
    model, cfg = load_export_for_command(a.checkpoint, settings, a.config, sections=("data", "eval"),
                                         allow_other_kb=a.allow_other_kb)
    verify_eval_data(cfg, a.split)
    cache_file, key = kb_cache_location(a.checkpoint, cfg, device) if cfg.eval.save_kb_cache else (None, None)
    model.to(device)
    result = evaluate_split(model, cfg, a.split, device, kb_cache_path=cache_file, cache_key=key)
    if D.is_main():
        board = write_outputs(result, cfg, out, a.checkpoint, a.name)
        print(cache_line(result.kb_cache))
        print(one_line(result))
        print(board.read_text())


if __name__ == "__main__":
    main()
