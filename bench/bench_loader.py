"""Data path: conversion throughput, then training-loader throughput against a published-style loader.

    python -m bench.bench_loader [--preset demo] [--seconds 20] [--raw DIR] [--raw-image-size N]
                                 [--loader-workers 1,2] [--step-rate SAMPLES_PER_S]

1. Generates the synthetic benchmark (``data_shards.synthetic``) into a temporary folder, or reuses
   ``--raw DIR``.
2. Converts it to shards at the CLIP input size (224) with 1 and with 2 worker processes and prints
   samples/s and MB/s (source bytes read, shard bytes written) of each, and their ratio.
3. Training loader, samples/s, same run, same samples:
   ours       ``TrainStream`` + ``make_loader`` (2 workers, batch 32): pre-resized JPEGs from the shards,
              gold entities by random access into the KB shards, batched tokenisation;
   published  a map-style Dataset over the mention records in a torch DataLoader (2 workers, batch 32)
              that, for every sample, opens the ORIGINAL mention JPEG and the gold entity's original
              JPEG, runs transformers' PIL-based ``CLIPImageProcessor`` (resize 224, centre crop,
              normalise) on each, and tokenises both texts with the same tokenizer.
   Ours runs for ``--seconds`` (whole epochs are restarted if it gets through one); the baseline then
   runs over the same number of samples. Both batches are checked to have the same tensor shapes.
4. Our loader alone with each of ``--loader-workers`` DataLoader workers: samples/s, samples/s per
   worker and samples per CPU second (every process's CPU time: a measure other jobs do not inflate),
   and, given ``--step-rate`` (the samples/s a training step consumes, e.g. bench_train's projection for
   a GPU), how many cores keep that step fed at the measured samples per CPU second.
5. The per-sample split on one core (torch and the loop in this process, one thread): JPEG decode,
   normalisation to float pixels, tokenisation of the two texts, per mention plus its gold entity, from
   the train shards; what the rest of the loader costs (shard reads, JSON, collation, worker transfer)
   is the difference to 1 / (samples per CPU second).
Both loaders' times include starting their workers. The synthetic images are small (64 px by
default); real datasets' images are larger, which makes the per-sample path slower still
(``--raw-image-size`` generates larger ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_shards import reader
from data_shards.collate import Collator, load_tokenizer
from data_shards.convert import ConvertSettings, convert
from data_shards.folder import ShardFolder
from data_shards.stream import TrainStream, make_loader, read_positions
from data_shards.synthetic import generate, preset

DATASET = "synthetic"
MAX_LENGTH = 50


def slow_clip_processor():
    """transformers' PIL-based CLIP image processor with default CLIP settings (no torchvision needed).

    transformers 5 names it ``CLIPImageProcessorPil`` (``CLIPImageProcessor`` falls back to it, with a
    warning, when torchvision is absent); older versions call the PIL one ``CLIPImageProcessor``."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil()
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished (joined) children, e.g. DataLoader
    workers and conversion pool processes: a measure of work that other jobs on the machine do not inflate."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def source_bytes(raw: Path) -> int:
    """Bytes a conversion reads: the JSON files and the images."""
    files = [p for p in raw.glob("*.json")]
    total = sum(p.stat().st_size for p in files)
    for sub in ("kb_image", "mention_image"):
        if (raw / sub).is_dir():
            total += _dir_bytes(raw / sub)
    return total


def measure_conversion(raw: Path, out: Path, workers: int, image_size: int) -> dict:
    c0, t0 = cpu_seconds(), time.perf_counter()
    manifest = convert(DATASET, raw, out, ConvertSettings(image_size=image_size, workers=workers))
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    samples = sum(manifest["counts"].values())  # entities + mentions of every split
    written = sum((out / e["name"]).stat().st_size for shards in manifest["shards"].values() for e in shards)
    return {"workers": workers, "seconds": seconds, "cpu_s": cpu, "samples": samples, "samples_per_s": samples / seconds,
            "read_mb_per_s": source_bytes(raw) / 1e6 / seconds, "written_mb_per_s": written / 1e6 / seconds}


class PublishedStyleDataset(Dataset):
    """One item per mention: both original JPEGs decoded and processed, both texts tokenised."""

    def __init__(self, raw: Path, collator: Collator) -> None:
        qid2id = reader.read_qid2id(raw)
        self.mentions = reader.read_split(raw, DATASET, "train", qid2id).mentions
        self.kb = reader.read_kb(raw)
        self.collator = collator  # only for the text layout and the tokenizer
        self.processor = slow_clip_processor()
        size = self.processor.crop_size
        self.shape = (3, size["height"], size["width"])

    def __len__(self) -> int:
        return len(self.mentions)

    def _image(self, path: Path | None) -> torch.Tensor:
        if path is None or not path.is_file():
            return torch.zeros(self.shape)  # the published code's fallback for a missing image
        with Image.open(path) as img:
            return self.processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def _tokens(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.collator.tokenizer(text, max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt")
        return enc["input_ids"][0], enc["attention_mask"][0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        m = self.mentions[i]
        e = self.kb[m.gold_id]
        m_ids, m_mask = self._tokens(self.collator.mention_text({"mention": m.mention, "sentence": m.sentence, "desc": m.desc}))
        e_ids, e_mask = self._tokens(self.collator.entity_text({"name": e.name, "desc": e.desc}))
        return {"m_input_ids": m_ids, "m_attention_mask": m_mask, "m_pixel_values": self._image(m.image_path),
                "e_input_ids": e_ids, "e_attention_mask": e_mask,
                "e_pixel_values": self._image(e.image_paths[0] if e.image_paths else None),
                "gold_id": torch.tensor(m.gold_id)}


def ours_shapes(batch: dict) -> dict[str, tuple]:
    return {f"{side[0]}_{k}": tuple(batch[side][k].shape) for side in ("mentions", "entities")
            for k in ("input_ids", "attention_mask", "pixel_values")}


def published_shapes(batch: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in batch.items() if k != "gold_id"}


def run_ours(shards: Path, collator: Collator, batch: int, workers: int, seconds: float) -> dict:
    stream = TrainStream(ShardFolder(shards), collator, batch, num_workers=workers, seed=0)
    samples, epoch, shapes = 0, 0, None
    c0, t0 = cpu_seconds(), time.perf_counter()
    while True:
        stream.set_position(epoch)
        for b in make_loader(stream, workers):
            if shapes is None:
                shapes = ours_shapes(b)
            samples += len(b["gold_ids"])
            if time.perf_counter() - t0 >= seconds:
                break
        else:
            epoch += 1
            continue
        break
    seconds = time.perf_counter() - t0  # the loader (and its workers) is gone once the loop is left
    return {"samples": samples, "seconds": seconds, "cpu_s": cpu_seconds() - c0, "shapes": shapes, "epochs": epoch + 1}


def run_published(raw: Path, collator: Collator, batch: int, workers: int, samples_wanted: int) -> dict:
    ds = PublishedStyleDataset(raw, collator)
    samples, epoch, shapes = 0, 0, None
    c0, t0 = cpu_seconds(), time.perf_counter()
    while samples < samples_wanted:
        g = torch.Generator().manual_seed(epoch)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=g, num_workers=workers,
                            multiprocessing_context="fork" if workers else None)
        for b in loader:
            if shapes is None:
                shapes = published_shapes(b)
            samples += len(b["gold_id"])
            if samples >= samples_wanted:
                break
        epoch += 1
        del loader  # joins the workers, so their CPU time is counted
    seconds = time.perf_counter() - t0
    return {"samples": samples, "seconds": seconds, "cpu_s": cpu_seconds() - c0, "shapes": shapes, "epochs": epoch}


def per_worker(shards: Path, collator: Collator, batch: int, counts: list[int], seconds: float,
               step_rate: float | None) -> None:
    """Our loader alone with each worker count: its rate per worker and per CPU second, and the cores a
    training step consuming ``step_rate`` samples/s needs (at the best samples per CPU second measured)."""
    print(f"\nour loader by worker count (batch {batch}, {collator.image_size} px, {seconds:.0f} s each)")
    print(f"{'workers':<9}{'samples/s':>11}{'per worker':>12}{'CPU s':>8}{'samples/CPU s':>15}")
    best = 0.0
    for w in counts:
        r = run_ours(shards, collator, batch, w, seconds)
        rate, per_cpu = r["samples"] / r["seconds"], r["samples"] / r["cpu_s"]
        best = max(best, per_cpu)
        print(f"{w:<9}{rate:>11.1f}{rate / max(w, 1):>12.1f}{r['cpu_s']:>8.1f}{per_cpu:>15.1f}")
    if step_rate:
        print(f"a step consuming {step_rate:,.0f} samples/s needs {step_rate / best:.1f} cores of this machine's kind "
              f"at {best:.1f} samples per CPU second (decode, normalise, tokenise, collate; the main process included)")


def per_sample_split(shards: Path, collator: Collator, n: int = 256) -> dict[str, float]:
    """Milliseconds per training sample (a mention and its gold entity, so two images and two texts) of
    JPEG decode, normalisation and tokenisation, on one core, from the first ``n`` train mentions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = list(read_positions(ShardFolder(shards).shard_set("train"), [0], 0, n))
        jpgs = [s["jpg"] for s in samples if s.get("jpg")]
        texts = [collator.mention_text(json.loads(s["json"])) for s in samples]
        t0 = time.perf_counter()
        arrays = [collator.decode(jpg) for jpg in jpgs]
        decode = (time.perf_counter() - t0) / len(jpgs)
        raw = np.stack(arrays[:32])
        t0 = time.perf_counter()
        for _ in range(5):
            collator.normalise(raw)
        normalise = (time.perf_counter() - t0) / (5 * len(raw))
        t0 = time.perf_counter()
        for i in range(0, len(texts), 32):
            collator._tokens(texts[i:i + 32])
        tokenise = (time.perf_counter() - t0) / len(texts)
    finally:
        torch.set_num_threads(threads)
    # Two images and two texts per training sample; the mentions' share of rows with an image is used for both.
    share = len(jpgs) / len(samples)
    return {"images": len(jpgs), "jpeg_kib": float(np.mean([len(j) for j in jpgs])) / 1024, "image_share": share,
            "decode_ms": 2 * share * decode * 1e3, "normalise_ms": 2 * normalise * 1e3,
            "tokenise_ms": 2 * tokenise * 1e3}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo", help="synthetic preset (data_shards.synthetic)")
    p.add_argument("--raw", type=Path, help="reuse this generated synthetic dataset folder instead of generating one")
    p.add_argument("--raw-image-size", type=int, help="side of the generated source images (default: the preset's)")
    p.add_argument("--seconds", type=float, default=20.0, help="time budget of our loader; the baseline gets the same samples")
    p.add_argument("--image-size", type=int, default=224, help="CLIP input size (ViT-B/32: 224)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loaders, and of the faster conversion")
    p.add_argument("--loader-workers", default="1,2", help="worker counts for our loader alone (comma-separated; '' skips)")
    p.add_argument("--step-rate", type=float, help="samples/s a training step consumes: print the cores that feed it")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader-"))
    try:
        raw = a.raw
        if raw is None:
            overrides = {"image_size": a.raw_image_size} if a.raw_image_size else {}
            settings = preset(a.preset, **overrides)
            t0 = time.perf_counter()
            generate(tmp / "raw", settings, workers=2, progress=False)
            raw = tmp / "raw"
            print(f"generated preset {a.preset!r} in {time.perf_counter() - t0:.1f}s: "
                  + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()
                              if k in ("num_entities", "num_train", "num_dev", "num_test", "image_size")))
        print(f"source: {raw} ({source_bytes(raw) / 1e6:.1f} MB of JSON and images); "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other jobs on the machine skew wall times)")

        # Conversion, 1 worker and a.workers workers (the latter's shards feed the loaders).
        conv = {}
        for w in (1, a.workers):
            conv[w] = measure_conversion(raw, tmp / f"shards-w{w}", w, a.image_size)
        print(f"\nconversion at --image-size {a.image_size} ({conv[1]['samples']} samples: entities + mentions)")
        print(f"{'workers':<9}{'seconds':>9}{'samples/s':>11}{'read MB/s':>11}{'written MB/s':>14}{'CPU s':>8}")
        for w, r in conv.items():
            print(f"{w:<9}{r['seconds']:>9.1f}{r['samples_per_s']:>11.1f}{r['read_mb_per_s']:>11.2f}{r['written_mb_per_s']:>14.2f}"
                  f"{r['cpu_s']:>8.1f}")
        print(f"conversion speed-up, {a.workers} workers / 1 worker: {conv[1]['seconds'] / conv[a.workers]['seconds']:.2f}x")
        shards = tmp / f"shards-w{a.workers}"
        if a.workers != 1:
            shutil.rmtree(tmp / "shards-w1")

        # Loaders.
        collator = Collator(load_tokenizer(shards / "tokenizer"), a.image_size, MAX_LENGTH)
        ours = run_ours(shards, collator, a.batch, a.workers, a.seconds)
        base = run_published(raw, collator, a.batch, a.workers, ours["samples"])
        if ours["shapes"] != base["shapes"]:
            raise SystemExit(f"the loaders produce different shapes: ours {ours['shapes']}, published-style {base['shapes']}")
        print(f"\ntraining loader: batch {a.batch}, {a.workers} workers, image {a.image_size}, text {MAX_LENGTH} tokens; "
              f"torch threads {torch.get_num_threads()}")
        print("shapes (same for both): " + ", ".join(f"{k} {list(v)}" for k, v in ours["shapes"].items()))
        print(f"{'loader':<18}{'samples':>9}{'seconds':>9}{'samples/s':>11}{'CPU s':>8}{'samples/CPU s':>15}")
        for name, r in (("published-style", base), ("ours", ours)):
            print(f"{name:<18}{r['samples']:>9}{r['seconds']:>9.1f}{r['samples'] / r['seconds']:>11.1f}{r['cpu_s']:>8.1f}"
                  f"{r['samples'] / r['cpu_s']:>15.1f}")
        ratio = (ours["samples"] / ours["seconds"]) / (base["samples"] / base["seconds"])
        cpu_ratio = (ours["samples"] / ours["cpu_s"]) / (base["samples"] / base["cpu_s"])
        print(f"loader speed-up (ours / published-style): {ratio:.2f}x samples/s, {cpu_ratio:.2f}x samples per CPU second")
        counts = [int(w) for w in a.loader_workers.split(",") if w.strip()]
        if counts:
            per_worker(shards, collator, a.batch, counts, a.seconds, a.step_rate)
        split = per_sample_split(shards, collator)
        print(f"\nper training sample on one core (mention + gold entity; {split['images']} JPEGs of "
              f"{split['jpeg_kib']:.1f} KiB, {split['image_share']:.0%} of rows with an image): "
              f"decode {split['decode_ms']:.2f} ms, normalise {split['normalise_ms']:.2f} ms, "
              f"tokenise {split['tokenise_ms']:.2f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
