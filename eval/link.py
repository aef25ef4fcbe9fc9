"""Link one query mention against the whole KB with a trained model export.

    python -m eval.link --checkpoint runs/NAME/best --sentence "..." --mention "..." [--image PATH]
                        [--desc "..."] [--top-k 5] [--shards DIR] [--mode exact|two-stage]

Prints the top-k entities (id, QID, name, score). The KB defaults to the export config's
``data.shards``. The query goes through the very preprocessing of training: the image is
prepared as the converter prepares it (``data_shards.images.prepare_image``: resize, centre crop,
JPEG at the conversion's quality), then decoded and normalised by the collator, and the text is
laid out by the collator (``mention [SEP] sentence [SEP] description``). No image is allowed (the
model's "no image" vectors are used); an image path that does not exist is an error.

The KB is encoded once into an entity cache saved next to the checkpoint as
``kb_cache-<first 12 hex of the manifest sha256>.pt`` (a dict of tensors, read back with
``torch.load(..., weights_only=True)``) and reused while the manifest hash and the modification
time of the checkpoint's weights match. :func:`link` is the Python entry point; :class:`Linker`
keeps the model and the cache for many queries.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from data_shards.images import prepare_image
from data_shards.store import EntityStore
from data_shards.stream import load_manifest
from eval.encode import encode_kb
from eval.evaluate import manifest_hash
from eval.ranking import autocast_for, build_index, search
from model.export import EXPORT_WEIGHTS, check_data_identity, load_export
from model.factory import make_collator
from model.mmoe import BATCH_KEYS
from moe.features import SideCache

CACHE_VERSION = 1
SIDE_PREFIX = "side."


@dataclass
class LinkResult:
    rank: int
    entity_id: int
    qid: str
    name: str
    score: float


def cache_path(checkpoint: str | Path, manifest_sha256: str) -> Path:
    return Path(checkpoint) / f"kb_cache-{manifest_sha256[:12]}.pt"


def _cache_meta(manifest_sha256: str, weights_mtime_ns: int, entities: int) -> dict[str, Tensor]:
    return {"meta.version": torch.tensor(CACHE_VERSION),
            "meta.manifest_sha256": torch.frombuffer(bytearray(bytes.fromhex(manifest_sha256)), dtype=torch.uint8),
            "meta.weights_mtime_ns": torch.tensor(weights_mtime_ns, dtype=torch.int64),
            "meta.entities": torch.tensor(entities, dtype=torch.int64)}


def load_cache(path: Path, manifest_sha256: str, weights_mtime_ns: int, entities: int) -> SideCache | None:
    """The saved entity cache if it exists and was built from this KB and these weights, else None."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged cache is rebuilt, whatever the cause
        print(f"warning: could not read {path} ({type(err).__name__}: {err}); encoding the KB again", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        return None
    expected = _cache_meta(manifest_sha256, weights_mtime_ns, entities)
    for k, v in expected.items():
        if k not in data or not isinstance(data[k], Tensor) or not torch.equal(data[k], v):
            return None
    side = {k[len(SIDE_PREFIX):]: v for k, v in data.items() if k.startswith(SIDE_PREFIX)}
    if not side:
        return None
    cache = SideCache(side)
    return cache if len(cache) == entities else None


def save_cache(path: Path, cache: SideCache, manifest_sha256: str, weights_mtime_ns: int) -> None:
    data = {SIDE_PREFIX + k: v.detach().cpu().contiguous() for k, v in cache.tensors.items()}
    data.update(_cache_meta(manifest_sha256, weights_mtime_ns, len(cache)))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)  # never a half-written cache under the final name


def check_image(image: str | Path) -> Path:
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"query image {path} not found (leave --image out to link without an image)")
    return path


class Linker:
    """A loaded export, its collator and the KB's entity cache, ready for queries."""

    def __init__(self, checkpoint: str | Path, shards: str | Path | None = None,
                 device: str | torch.device | None = None, allow_other_kb: bool = False) -> None:
        self.checkpoint = Path(checkpoint)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.cfg = load_export(self.checkpoint)
        if shards is not None:
            self.cfg.data.shards = str(shards)
        self.shards = Path(self.cfg.data.shards)
        self.manifest = load_manifest(self.shards)
        self.model.to(self.device).eval()
        self.collator = make_collator(self.cfg, self.model)
        check_data_identity(self.checkpoint, self.cfg, allow_other_kb)  # DataMismatch (ValueError) names what differs
        self.store = EntityStore(self.shards)
        self.manifest_sha256 = manifest_hash(self.shards)
        self.cache_file = cache_path(self.checkpoint, self.manifest_sha256)
        self.cache_reused = False
        self.kb = self._entity_cache().to(self.device)
        self._index = None

    def _entity_cache(self) -> SideCache:
        sha = self.manifest_sha256
        mtime = (self.checkpoint / EXPORT_WEIGHTS).stat().st_mtime_ns
        n = len(self.store)
        cache = load_cache(self.cache_file, sha, mtime, n)
        if cache is not None:
            self.cache_reused = True
            return cache
        e = self.cfg.eval
        cache = encode_kb(self.model, self.shards, self.collator, self.device, batch_size=e.batch_size,
                          num_workers=e.num_workers, bf16=e.bf16, distributed=False)
        save_cache(self.cache_file, cache, sha, mtime)
        return cache

    def query_batch(self, sentence: str, mention: str, image: str | Path | None = None, desc: str = "") -> dict:
        """The collated one-mention batch, prepared exactly as training data is."""
        jpg = None
        if image is not None:
            path = check_image(image)
            quality = int(self.manifest.get("settings", {}).get("jpeg_quality", 90))
            jpg, reason = prepare_image(path, self.collator.image_size, quality)
            if jpg is None:
                raise ValueError(f"query image {path} could not be read: {reason}")
        meta = {"mention": mention, "sentence": sentence, "desc": desc, "gold_id": -1, "index": 0, "id": "query"}
        return self.collator.mentions([{"json": meta, "jpg": jpg}])

    def _query_side(self, batch: dict) -> SideCache:
        inputs = {k: batch[k].to(self.device) for k in BATCH_KEYS}
        with torch.no_grad(), autocast_for(self.device, self.cfg.eval.bf16):
            side, _ = self.model.mention_side(inputs)
        return side.to(dtype=torch.float32)

    def _score_all(self, q: SideCache) -> Tensor:
        """Overall scores [N] of the query against every KB entity, in blocks of bounded memory."""
        n = len(self.kb)
        cost = max([1] + [self.kb[f"{u}.query"].shape[1] * q[f"{u}.key"].shape[1]
                          for u in ("text", "vision") if f"{u}.query" in self.kb])
        block = max(1, self.cfg.eval.max_pair_elements // cost)
        row = torch.empty(n, device=self.device)
        with torch.no_grad(), autocast_for(self.device, self.cfg.eval.bf16):
            for s in range(0, n, block):
                row[s : s + block] = self.model.matcher.score(q, self.kb.slice(s, s + block))["overall"][0].float()
        return row

    def _two_stage(self, q: SideCache, top_k: int) -> tuple[Tensor, Tensor]:
        """FAISS retrieves max(top_k, eval.top_k) candidates; the full matcher re-ranks them."""
        if self._index is None:
            self._index = build_index(self.model.matcher.separable_vectors(self.kb), self.cfg.eval.index)
        k = min(max(top_k, self.cfg.eval.top_k), len(self.kb))
        _, cand = search(self._index, self.model.matcher.separable_vectors(q), k)
        cand = cand[0][cand[0] >= 0].to(self.device)  # FAISS pads with -1 when it finds fewer
        with torch.no_grad(), autocast_for(self.device, self.cfg.eval.bf16):
            scores = self.model.matcher.score_pairs(q.select(torch.zeros_like(cand)), self.kb.select(cand))["overall"].float()
        return scores, cand

    def query(self, sentence: str, mention: str, image: str | Path | None = None, desc: str = "", top_k: int = 5,
              mode: str = "exact") -> list[LinkResult]:
        if mode not in ("exact", "two-stage"):
            raise ValueError(f"mode must be exact or two-stage, got {mode!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        q = self._query_side(self.query_batch(sentence, mention, image, desc))
        if mode == "exact":
            scores = self._score_all(q)
            ids = torch.arange(len(scores), device=scores.device)
        else:
            scores, ids = self._two_stage(q, top_k)
        top = scores.topk(min(top_k, scores.numel()))
        out = []
        for r, (s, i) in enumerate(zip(top.values.tolist(), ids[top.indices].tolist(), strict=True), start=1):
            meta = self.store.get(int(i))["json"]
            out.append(LinkResult(r, int(i), meta["qid"], meta["name"], float(s)))
        return out


def link(checkpoint: str | Path, sentence: str, mention: str, image: str | Path | None = None, desc: str = "",
         top_k: int = 5, shards: str | Path | None = None, mode: str = "exact",
         device: str | torch.device | None = None, allow_other_kb: bool = False) -> list[LinkResult]:
    """Top-k KB entities for one mention (see the module docstring); builds or reuses the KB cache."""
    if image is not None:
        check_image(image)  # before loading the model and encoding the KB
    return Linker(checkpoint, shards, device, allow_other_kb).query(sentence, mention, image, desc, top_k, mode)


def format_results(results: list[LinkResult]) -> str:
    width = max([len(r.qid) for r in results] + [3])
    lines = [f"{'rank':>4}  {'id':>8}  {'QID':<{width}}  {'score':>9}  name"]
    lines += [f"{r.rank:>4}  {r.entity_id:>8}  {r.qid:<{width}}  {r.score:>9.4f}  {r.name}" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Link one mention against the whole KB and print the top-k entities.")
    p.add_argument("--checkpoint", required=True, help="model export folder (runs/NAME/best)")
    p.add_argument("--sentence", required=True)
    p.add_argument("--mention", required=True, help="the mention's surface form in the sentence")
    p.add_argument("--image", help="the mention's image (any format PIL reads); omit for none")
    p.add_argument("--desc", default="", help="description appended to the mention text (the DME step)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--shards", help="converted KB (default: the export config's data.shards)")
    p.add_argument("--mode", choices=["exact", "two-stage"], default="exact")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--allow-other-kb", action="store_true",
                   help="link against a KB other than the one the export was trained on (the tokenizer must still match)")
    a = p.parse_args(argv)
    try:
        if a.image is not None:
            check_image(a.image)
        linker = Linker(a.checkpoint, a.shards, a.device, a.allow_other_kb)
        results = linker.query(a.sentence, a.mention, a.image, a.desc, a.top_k, a.mode)
    except (FileNotFoundError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    state = "reused" if linker.cache_reused else "built"
    print(f"KB {linker.shards} ({len(linker.kb)} entities), entity cache {state}: {linker.cache_file}")
    print(format_results(results))


if __name__ == "__main__":
    main()
