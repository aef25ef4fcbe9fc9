"""Hard negatives mined with FAISS from the model's own index.

Mining: encode the KB with the current model (the separable part of the score, as the two-stage
evaluation), build a FAISS inner-product index (exact ``flat`` by default; ``ivf``/``ivfpq`` for
KBs of millions), search the top-K entities for every training mention, drop the gold entity and
any entity with the gold's QID, and keep a table [training mentions, K] of entity ids (-1 where
fewer than K remain), rows in mention-index order. The KB encoding and the mentions are split
across ranks and gathered, so every rank ends with the same table. The training stream attaches
``n_hard`` negatives per mention from its row (the top ranks, or a seeded random draw within the
top-K); the loss scores every mention against the batch's gold entities plus all of the batch's
hard negatives (shared negatives keep the cost a matrix product).

    python -m train.negatives --checkpoint runs/NAME/best --out negatives.npy [--top-k 100] [--index flat]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_write
from core.cli import disk_full_line
from data_shards.folder import ShardFolder
from data_shards.store import EntityStore
from data_shards.stream import TrainStream
from eval.encode import check_interrupt, encode_kb, encode_split
from eval.ranking import build_index, search
from eval.sharded import empty_like_rank0
from model import distributed as D
from model.config import INDEX_KINDS, Config, ConfigError
from model.export import load_export_for_command
from model.factory import make_collator
from model.mmoe import MMoEModel
from model.modes import eval_mode
from moe.expert_parallel import local_experts
from train.observe import RankLog, RunLog
from train.phases import PhaseClock
from train.state import TrainState


def entity_qids(store: EntityStore, ids: np.ndarray) -> dict[int, str]:
    """QIDs of the given entity ids (read from the entity store, once per distinct id)."""
    return {int(i): store.get(int(i))["json"]["qid"] for i in np.unique(ids) if i >= 0}


def nearest_negatives(
    mention_vecs: torch.Tensor, index, gold: np.ndarray, top_k: int, qid_of=None, slack: int = 8
) -> np.ndarray:
    """[M, top_k] entity ids nearest to each mention vector, without the gold entity and without
    entities sharing the gold's QID (``qid_of``: callable ids -> {id: qid}); -1 pads a row that
    runs out of candidates."""
    k = min(top_k + slack, index.ntotal)
    _, cand = search(index, mention_vecs, k)
    cand = cand.numpy()
    keep = cand != gold[:, None]
    keep &= cand >= 0
    if qid_of is not None:
        qids = qid_of(np.concatenate([cand.reshape(-1), gold]))
        gold_q = np.array([qids.get(int(g)) for g in gold], dtype=object)
        cand_q = np.vectorize(lambda i: qids.get(int(i)), otypes=[object])(cand)
        keep &= cand_q != gold_q[:, None]
    out = np.full((len(cand), top_k), -1, dtype=np.int64)
    for r in range(len(cand)):  # rows keep their rank order
        row = cand[r][keep[r]][:top_k]
        out[r, : len(row)] = row
    return out


def mine(model: MMoEModel, cfg: Config, device: torch.device, collator, split: str = "train",
         interrupt: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict]:
    """Mine the table for every mention of ``split`` (collective: every rank calls it). ``interrupt``
    (collective) is asked while encoding and between the stages; it stops mining with eval.encode.Interrupted."""
    with eval_mode(model):  # as evaluate_split: the caller's mode back on every way out (an interrupt included)
        return _mine(model, cfg, device, collator, split, interrupt)


def _mine(model: MMoEModel, cfg: Config, device: torch.device, collator, split: str,
          interrupt: Callable[[], bool] | None) -> tuple[np.ndarray, dict]:
    n = cfg.negatives
    folder = ShardFolder.open(cfg.data.shards)
    t0 = time.perf_counter()
    batch = cfg.eval.batch_size
    io = dict(batch_size=batch, num_workers=cfg.eval.num_workers, bf16=cfg.eval.bf16)
    # Each rank encodes its KB slice and shares only the slice's separable vectors (the index needs nothing
    # else): a few hundred floats per entity on every rank instead of the whole entity cache.
    kb = empty_like_rank0(encode_kb(model, folder, collator, device, desc="mining: encode KB",
                                    interrupt=interrupt, sharded=True, **io), device)
    vectors = D.gather_rows(model.matcher.separable_vectors(kb))
    del kb
    t_kb = time.perf_counter()
    index = build_index(vectors, n.index)
    check_interrupt(interrupt, "mining: after the index")
    t_index = time.perf_counter()
    ms, ids = encode_split(model, folder, split, collator, device, desc=f"mining: encode {split}",
                           interrupt=interrupt, **io)
    check_interrupt(interrupt, "mining: after the mentions")
    store = folder.store()
    local = nearest_negatives(model.matcher.separable_vectors(ms), index, ids["gold_id"].cpu().numpy(), n.top_k,
                              qid_of=lambda a: entity_qids(store, a))
    table = D.gather_rows(torch.from_numpy(local).to(device)).cpu().numpy()
    order = D.gather_rows(ids["index"].to(device)).cpu().numpy()
    if not np.array_equal(order, np.arange(len(order))):
        raise RuntimeError("mined rows are not in mention order: the split's shards disagree with the manifest")
    stats = {"mentions": len(table), "top_k": n.top_k, "kb_size": len(vectors), "index": n.index,
             "encode_kb_s": t_kb - t0, "index_s": t_index - t_kb, "total_s": time.perf_counter() - t0,
             "short_rows": int((table[:, -1] < 0).sum())}
    return table, stats


def save_table(table: np.ndarray, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        np.save(fh, table.astype(np.int64))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def load_table(path: str | Path, mentions: int | None = None) -> np.ndarray:
    table = np.load(path, allow_pickle=False)
    if table.ndim != 2 or table.dtype != np.int64:
        raise ValueError(f"{path}: expected an int64 [mentions, K] table of entity ids")
    if mentions is not None and len(table) != mentions:
        raise ValueError(f"{path} has {len(table)} rows but the training split has {mentions} mentions: mined for other data?")
    return table


class NegativesSchedule:
    """The trainer's negatives: mined at the epoch starts negatives.warmup_epochs and negatives.refresh_epochs
    say (or read from negatives.from_file), the current table attached to the training stream."""

    def __init__(self, engine, cfg: Config, device: torch.device, collator, stream: TrainStream, run_dir: Path,
                 clock: PhaseClock,
log: RunLog, console: RankLog, interrupt: Callable[[], bool]) -> None:
        """``interrupt`` (collective): asked
        while mining, as in ``mine``."""
        self.engine, self.cfg, self.device, self.collator, self.stream = engine, cfg, device, collator, stream
        self.run_dir, self.clock, self.log, self.console, self.interrupt = run_dir, clock, log, console, interrupt
        self.attached: str | None = None  # negatives table currently attached to the stream

    def for_epoch(self, st: TrainState) -> None:
        """Mine when the schedule says so (at an epoch start), then attach the current table. A stop signal
        while mining raises eval.encode.Interrupted (the state untouched: the resumed run mines again)."""
        n = self.cfg.negatives
        if not n.enabled:
            return
        e = st.epoch
        if st.negatives_file is None and n.from_file:
            st.negatives_file = n.from_file
        since = e - n.warmup_epochs
        due = since == 0 or (since > 0 and n.refresh_epochs > 0 and since % n.refresh_epochs == 0)
        if due and st.batch == 0 and st.negatives_epoch != e:
            with self.clock.phase("mining"), local_experts(self.engine.module) as model:  # every expert on every rank
                table, stats = mine(model, self.cfg, self.device, self.collator, interrupt=self.interrupt)
            path = self.run_dir / "negatives" / f"epoch-{e:03d}.npy"
            if D.is_main():
                save_table(table, path, {"epoch": e, "step": st.step, **stats})
            self.console.info(f"[negatives] mined {stats['mentions']} x {stats['top_k']} in {stats['total_s']:.1f}s "
                              f"(KB {stats['kb_size']}) -> {path}")
            D.barrier()
            st.negatives_file, st.negatives_epoch = str(path), e
            self.log.log(st.step, {f"negatives/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
        if st.negatives_file and (self.attached != st.negatives_file):
            self.stream.set_negatives(load_table(st.negatives_file), n.n_hard, n.strategy)
            self.attached = st.negatives_file


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Mine hard negatives for a split with a trained model (FAISS).")
    p.add_argument("--checkpoint", required=True, help="model export (runs/NAME/best)")
    p.add_argument("--out", required=True, type=Path, help="output .npy table [mentions, top_k] of entity ids")
    p.add_argument("--split", default="train")
    p.add_argument("--top-k", type=int)
    p.add_argument("--index", choices=list(INDEX_KINDS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--allow-other-kb", action="store_true", help="mine on a KB other than the one the export was trained on")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    D.init_process_group()
    device = D.device_for_rank()
    try:
        settings = [f"negatives.top_k={a.top_k}"] if a.top_k else []
        settings += [f"negatives.index={a.index}"] if a.index else []
        model, cfg = load_export_for_command(a.checkpoint, settings + a.overrides, allow_other_kb=a.allow_other_kb)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:
        line = disk_full_line(err)
        if line is None:
            raise
        sys.exit(line)
    model.to(device)
    table, stats = mine(model, cfg, device, make_collator(cfg, model), a.split)
    if D.is_main():
        save_table(table, a.out, {"checkpoint": str(a.checkpoint), "split": a.split, **stats})
        print(f"mined {stats['mentions']} x {stats['top_k']} negatives in {stats['total_s']:.1f}s "
              f"(KB {stats['kb_size']} entities, index {stats['index']}): {a.out}")
    D.barrier()


if __name__ == "__main__":
    main()
