"""Streaming the shards: the training stream, eval streams (mentions in order) and the KB stream.

Shards are read sequentially with webdataset's tar iterator (so they may live on any storage
webdataset opens). Who reads what is decided here rather than by webdataset's
``split_by_node``/``split_by_worker``, which hand out whole shards: with unequal shard counts per
rank the ranks get unequal batch counts and a DDP/DeepSpeed job hangs at the last step.

Training epoch plan, for (seed, epoch):
1. the shard order is a permutation drawn from (seed, epoch); the epoch's sample sequence is the
   concatenation of the shards in that order (N samples);
2. rank r takes the contiguous positions [r*P, (r+1)*P) with P = ceil(N / world); positions past N
   wrap to the start of the sequence and are flagged as padding (weight 0 in the loss), so every
   rank has exactly P samples and the same number of batches, and every mention counts once;
3. the rank's range is cut into batch-aligned contiguous blocks, one per DataLoader worker; each
   worker streams its block through a shuffle buffer seeded by (seed, epoch, rank, worker) and
   yields collated batches. The DataLoader returns workers' batches round-robin, so the batch
   sequence of a rank is a function of (seed, epoch, world, rank, batch size, workers).
Resume: the saved position is (epoch, batches done k); each worker skips the batches of its own
that were consumed (reading but not decoding them), and DataLoader worker p plays the role of
worker (p + k) mod W, because the DataLoader restarts its round-robin at worker 0. Per-worker
batch counts are non-increasing and differ by at most one, so the rotated round-robin (skipping
exhausted workers) continues the original sequence exactly.
"""

from __future__ import annotations

import atexit
import json
import math
import multiprocessing
import signal
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards.collate import Collator
from data_shards.folder import ShardFolder, ShardSet
from data_shards.store import ShardError


def _decode(sample: dict) -> dict:
    return {"json": json.loads(sample["json"]), "jpg": sample.get("jpg")}


def read_positions(shards: ShardSet, order: list[int], start: int, stop: int) -> Iterator[dict]:
    """Samples at positions [start, stop) of the concatenation of ``shards`` in ``order``.

    Only shards overlapping the range are opened. Samples are yielded raw (bytes), undecoded.
    """
    pos = 0
    for s in order:
        n = shards.counts[s]
        if pos + n <= start:
            pos += n
            continue
        if pos >= stop:
            return
        i = 0  # position among the used samples of this shard
        read = 0  # samples of the file read so far
        path, expected = shards.paths[s], shards.file_counts[s]
        try:
            for sample in wds.tarfile_samples([{"url": str(path)}]):
                if "json" not in sample:
                    raise ShardError(f"{path}: sample {sample.get('__key__')!r} has no .json member: the shard is "
                                     "truncated or damaged (python -m data_shards.verify checks every shard)")
                j, read = read, read + 1
                if read > expected:
                    raise ShardError(f"{path} holds more than the {expected} samples the manifest lists: it was replaced; "
                                     "convert the dataset again")
                if shards.keep is not None and not shards.keep[shards.first[s] + j]:
                    continue
                if pos + i >= stop:
                    break
                if pos + i >= start:
                    yield sample
                i += 1
            else:  # the whole file was read: a shortfall means it lost samples
                if read < expected:
                    raise ShardError(f"{path} holds {read} samples but the manifest lists {expected}: the shard is "
                                     "truncated (python -m data_shards.verify checks every shard)")
        except ShardError:
            raise
        except Exception as err:  # tarfile.ReadError, OSError, ... from a damaged file
            raise ShardError(f"{path}: cannot read the shard ({type(err).__name__}: {err}); it is truncated or "
                             "damaged (python -m data_shards.verify checks every shard)") from err
        pos += n


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def aligned_ranges(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering ``n`` rows, each starting at a multiple of ``align``: whole
    blocks of ``align`` rows dealt evenly (the last block may be short; a part may be empty)."""
    return [(min(a * align, n), min(b * align, n)) for a, b in split_evenly(-(-n // align), parts)]


def worker_batch_blocks(n_samples: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Split a rank's samples into per-worker contiguous ranges made of whole batches
    (only the last range may end with a partial batch)."""
    n_batches = math.ceil(n_samples / batch_size)
    blocks = []
    for b0, b1 in split_evenly(n_batches, workers):
        blocks.append((min(b0 * batch_size, n_samples), min(b1 * batch_size, n_samples)))
    return blocks


def consumed_per_worker(batches_per_worker: list[int], consumed: int) -> list[int]:
    """How many batches each worker had delivered after ``consumed`` batches of the DataLoader,
    which takes one batch from each worker in turn, skipping exhausted workers."""
    done = [0] * len(batches_per_worker)
    remaining = consumed
    while remaining > 0:
        progressed = False
        for w, total in enumerate(batches_per_worker):
            if remaining == 0:
                break
            if done[w] < total:
                done[w] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"resume position {consumed} is past the end of the epoch ({sum(batches_per_worker)} batches)")
    return done


def shuffled(samples: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle buffer: keep ``buffer_size`` samples, emit a random one as each new one arrives."""
    buf: list = []
    for s in samples:
        if len(buf) < buffer_size:
            buf.append(s)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], s = s, buf[i]
        yield s
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


class TrainStream(IterableDataset):
    """Training batches: {"mentions", "entities" (the gold entities, from the entity store, then
    the batch's hard negatives if any), "gold_ids", "candidate_ids", "weight" (0 for padding),
    "epoch"}."""

    def __init__(
        self,
        folder: ShardFolder,
        collator: Collator,
        batch_size: int,
        *,
        seed: int = 0,
        world: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        split: str = "train",
        fraction: float = 1.0,
        fraction_mode: str = "random",
    ) -> None:
        self.root = folder.root
        self.shards = folder.shard_set(split).subset(fraction, seed, fraction_mode)
        if self.shards.total == 0:
            raise ValueError(f"{self.root}: the {split} split is empty")
        self.collator, self.batch_size = collator, batch_size
        self.seed, self.world, self.rank = seed, world, rank
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.store = folder.store()
        self.epoch, self.start_batch = 0, 0
        self.done: list[dict] = []  # earlier segments of the current epoch (set_position)
        self._universe_key: tuple | None = None  # the (epoch, segments) the cached universe below belongs to
        self._universe_value: list[int] | None = None
        self.negatives: np.ndarray | None = None
        self.n_hard, self.strategy = 0, "top"

    def set_negatives(self, table: np.ndarray | None, n_hard: int, strategy: str = "top") -> None:
        """Attach ``n_hard`` mined negatives per mention from ``table`` [mentions, K] (entity ids,
        -1 = none): the first ones (``top``) or a draw seeded by (seed, epoch, mention) (``random``)."""
        if table is not None and len(table) != sum(self.shards.file_counts):
            raise ValueError(f"negatives table has {len(table)} rows, the split has {sum(self.shards.file_counts)} mentions")
        self.negatives, self.n_hard, self.strategy = table, n_hard, strategy

    def _hard_negatives(self, indices: list[int], epoch: int) -> list[int]:
        picked: list[int] = []
        for i in indices:
            row = self.negatives[i]
            row = row[row >= 0]
            if self.strategy == "random" and len(row) > self.n_hard:
                row = np.random.default_rng([self.seed, epoch, i]).choice(row, self.n_hard, replace=False)
            picked += [int(x) for x in row[: self.n_hard]]
        return list(dict.fromkeys(picked))  # each entity once, first-come order

    # -- the epoch plan ----------------------------------------------------------------------------
    # An epoch may be trained in segments with different layouts (world size, batch size, workers): a
    # run resumed on other hardware in the middle of an epoch continues it over the samples the earlier
    # segments did not consume. Segment 0 covers the epoch's N positions; segment s+1 the sorted
    # positions that segments 0..s left, split over its ranks and workers the same way. Which samples a
    # segment consumed follows from replaying its shuffle buffers on positions (the buffer's draws depend
    # only on how many items it holds), so nothing but the segments' layouts needs to be saved.

    def _universe(self) -> list[int] | None:
        """The epoch positions the current segment covers, sorted; None: the whole epoch (segment 0)."""
        key = (self.epoch, json.dumps(self.done, sort_keys=True))
        if self._universe_key != key:
            universe = None
            for s, seg in enumerate(self.done):
                taken = self._consumed(s, universe, seg)
                universe = [p for p in (range(self.shards.total) if universe is None else universe) if p not in taken]
            self._universe_key, self._universe_value = key, universe
        return self._universe_value

    def segment_size(self) -> int:
        """Samples (without padding) the current segment of the epoch covers."""
        universe = self._universe()
        return self.shards.total if universe is None else len(universe)

    def _rng(self, rank: int, worker: int, segment: int) -> np.random.Generator:
        parts = [self.seed, self.epoch, rank, worker] + ([segment] if segment else [])  # segment 0: as ever
        return np.random.default_rng(parts)

    def _consumed(self, s: int, universe: list[int] | None, seg: dict) -> set[int]:
        """The real epoch positions segment ``s`` (layout ``seg``, ``seg["batches"]`` batches per rank) consumed."""
        m = self.shards.total if universe is None else len(universe)
        world, size, workers = seg["world"], seg["batch_size"], max(1, seg["num_workers"])
        per_rank = math.ceil(m / world)
        blocks = worker_batch_blocks(per_rank, size, workers)
        done = consumed_per_worker([math.ceil((b - a) / size) for a, b in blocks], seg["batches"])
        taken: set[int] = set()
        for rank in range(world):
            for w, (a, b) in enumerate(blocks):
                items = ((j - m if j >= m else j, j >= m) for j in range(rank * per_rank + a, rank * per_rank + b))
                rng = self._rng(rank, w, s)
                for j, pad in islice(shuffled(items, seg.get("shuffle_buffer", self.shuffle_buffer), rng), done[w] * size):
                    if not pad:
                        taken.add(j if universe is None else universe[j])
        return taken

    @property
    def samples_per_rank(self) -> int:
        """Samples each rank gets in the current segment of the epoch (padding included)."""
        return math.ceil(self.segment_size() / self.world)

    def batches_per_epoch(self) -> int:
        """Batches each rank gets in the current segment of the epoch (the whole epoch unless it was
        started with another layout); the same on every rank."""
        return sum(self._worker_batches())

    def full_epoch_batches(self) -> int:
        """Batches each rank gets in an epoch trained with this layout from its start."""
        blocks = worker_batch_blocks(math.ceil(self.shards.total / self.world), self.batch_size, max(1, self.num_workers))
        return sum(math.ceil((b - a) / self.batch_size) for a, b in blocks)

    def _worker_batches(self) -> list[int]:
        blocks = worker_batch_blocks(self.samples_per_rank, self.batch_size, max(1, self.num_workers))
        return [math.ceil((b - a) / self.batch_size) for a, b in blocks]

    def set_position(self, epoch: int, batches_done: int = 0, done_segments: list[dict] | tuple = ()) -> None:
        """Start the next iteration at ``epoch`` after ``batches_done`` batches of its current segment;
        ``done_segments``: the layouts and batch counts of the epoch's earlier segments (oldest first)."""
        self.epoch, self.done = epoch, [dict(seg) for seg in done_segments]
        if not 0 <= batches_done <= self.batches_per_epoch():
            raise ValueError(f"batches_done={batches_done} outside 0..{self.batches_per_epoch()}")
        self.start_batch = batches_done

    def _rank_samples(self, order: list[int], start: int, stop: int) -> Iterator[tuple[dict, bool]]:
        """Positions [start, stop) of this rank's range of the segment; positions past its size wrap as padding."""
        universe, m = self._universe(), self.segment_size()
        base = self.rank * self.samples_per_rank
        lo, hi = base + start, base + stop
        for a, b, pad in ((min(lo, m), min(hi, m), False), (max(lo, m) - m, hi - m, True)):
            if a >= b:
                continue
            if universe is None:
                for sample in read_positions(self.shards, order, a, b):
                    yield sample, pad
                continue
            wanted = universe[a:b]  # sorted epoch positions: one sequential read over their span
            keep = set(wanted)
            for pos, sample in enumerate(read_positions(self.shards, order, wanted[0], wanted[-1] + 1), start=wanted[0]):
                if pos in keep:
                    yield sample, pad

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != max(1, self.num_workers):
            raise RuntimeError(f"TrainStream was built for {self.num_workers} workers but runs in {n_workers}")
        epoch = self.epoch
        # The DataLoader always starts its round-robin at worker 0, but after k batches the next
        # one belongs to worker k mod W: rotate the roles so the sequence continues exactly.
        worker = (worker + self.start_batch) % n_workers
        order = list(np.random.default_rng([self.seed, epoch]).permutation(len(self.shards.counts)))
        start, stop = worker_batch_blocks(self.samples_per_rank, self.batch_size, n_workers)[worker]
        skip = consumed_per_worker(self._worker_batches(), self.start_batch)[worker]
        rng = self._rng(self.rank, worker, len(self.done))
        stream = shuffled(self._rank_samples(order, start, stop), self.shuffle_buffer, rng)
        batch: list[tuple[dict, bool]] = []
        k = 0
        for item in stream:
            batch.append(item)
            if len(batch) == self.batch_size:
                if k >= skip:
                    yield self._collate(batch, epoch)
                batch, k = [], k + 1
        if batch and k >= skip:
            yield self._collate(batch, epoch)

    def _collate(self, items: list[tuple[dict, bool]], epoch: int) -> dict:
        samples = [_decode(s) for s, _ in items]
        mentions = self.collator.mentions(samples)
        golds = mentions["gold_id"]
        ids = golds.tolist()
        if self.negatives is not None and self.n_hard > 0:
            ids += self._hard_negatives(mentions["index"].tolist(), epoch)
        entities = self.collator.entities(self.store.get_many(ids))
        return {
            "mentions": mentions,
            "entities": entities,
            "gold_ids": golds,
            "candidate_ids": entities["entity_id"],
            "weight": torch.tensor([0.0 if pad else 1.0 for _, pad in items]),
            "epoch": epoch,
        }


class OrderedStream(IterableDataset):
    """Samples of one shard group in order (a split's mentions, or the KB's entities), this
    rank's contiguous share only, collated into batches that carry their indices/ids. With
    ``align`` > 1 every rank's share starts at a multiple of ``align`` (whole blocks per rank)."""

    def __init__(self, folder: ShardFolder, group: str, collator: Collator, batch_size: int,
                 world: int = 1, rank: int = 0, align: int = 1) -> None:
        self.shards = folder.shard_set(group)
        self.is_kb = group == "kb"
        self.collator, self.batch_size = collator, batch_size
        ranges = aligned_ranges(self.shards.total, world, align)
        self.range = ranges[rank]
        # The fewest batches any rank's share makes: every rank reaches these batch numbers (a collective
        # check may run at them, eval/encode.py).
        self.common_batches = min(-(-(b - a) // batch_size) for a, b in ranges)

    def __len__(self) -> int:
        return self.range[1] - self.range[0]

    def __iter__(self) -> Iterator[dict]:
        """Batch i goes to worker i % workers: the DataLoader takes one batch from each worker in turn, so
        batches then arrive in dataset order (the caches' row order). Every worker reads the rank's range
        once and decodes only its own batches (the undecoded tar bytes of the others are skipped)."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        a, b = self.range
        order = list(range(len(self.shards.counts)))
        batch: list[dict] = []
        for i, sample in enumerate(read_positions(self.shards, order, a, b)):
            if (i // self.batch_size) % n_workers != worker:
                continue
            batch.append(_decode(sample))
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, samples: list[dict]) -> dict:
        return self.collator.entities(samples) if self.is_kb else self.collator.mentions(samples)


# Signals a scheduler or launcher sends to a whole process tree to stop a job (train/preemption.py).
_TREE_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGXCPU")


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore stop signals: torch's worker handler exits on SIGTERM, so the deepspeed
    launcher's SIGTERM to the whole tree would kill a worker under a rank that is finishing its step and
    writing a checkpoint. A worker still ends with its rank (torch's workers watch their parent)."""
    for name in _TREE_STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing SIGTERMs its daemonic children (DataLoader workers) and joins them;
    a worker ignores SIGTERM (above), so one still alive then (a loader whose iterator an exception kept)
    would hang the exit: end them first. atexit runs this before multiprocessing's own exit handler (LIFO)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


_reaper_installed = False


def make_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """DataLoader over a stream that yields whole batches. With CUDA the batches land in pinned
    memory, so their copies to the GPU overlap compute (the callers use non_blocking)."""
    global _reaper_installed
    if num_workers and not _reaper_installed:
        atexit.register(_kill_workers_at_exit)
        _reaper_installed = True
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      multiprocessing_context="fork" if num_workers else None, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_ignore_stop_signals if num_workers else None)

