"""Link one query mention against the whole KB with a trained model export.

    python -m eval.link --checkpoint runs/NAME/best --sentence "..." --mention "..." [--image PATH]
                        [--desc "..."] [--top-k 5] [--shards DIR] [--mode exact|two-stage]

Prints the top-k entities (id, QID, name, score). The KB defaults to the export config's
``data.shards``. The query goes through the very preprocessing of training: the image is
prepared as the converter prepares it (``data_shards.images.prepare_image``: resize, centre crop,
JPEG at the conversion's quality), then decoded and normalised by the collator, and the text is
laid out by the collator (``mention [SEP] sentence [SEP] description``). No image is allowed (the
model's "no image" vectors are used); an image path that does not exist is an error.

The KB is encoded once into an entity cache stored in ``eval.cache_dtype`` (eval/kb_cache.py;
``--cache-dtype`` overrides it) and saved next to the checkpoint as ``kb_cache-<first 16 hex of its
key>.pt``, the file ``eval.evaluate`` writes and reads: it is memory-mapped back while its key (KB
manifest, weights' sha256, model and data config, precision, cache dtype) matches, and rebuilt
otherwise. :func:`link` is the Python entry point; :class:`Linker` keeps the model and the cache for
many queries.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from data_shards.folder import ShardFolder
from data_shards.images import prepare_image
from eval.encode import encode_kb
from eval.evaluate import COMMAND_ERRORS, error_line, exit_with, kb_cache_location
from eval.kb_cache import CACHE_DTYPES, compress, expand, load_kb_cache, save_kb_cache
from eval.metrics import NonFiniteScoreError
from eval.ranking import autocast_for, kb_index, score_against_kb, search
from model.export import check_data_identity, load_export
from model.factory import make_collator
from model.mmoe import BATCH_KEYS
from moe.features import SideCache


@dataclass
class LinkResult:
    rank: int
    entity_id: int
    qid: str
    name: str
    score: float


def check_image(image: str | Path) -> Path:
    """``image`` as a path to a regular file; FileNotFoundError or ValueError says what it is instead."""
    path = Path(image)
    if not path.exists():
        raise FileNotFoundError(f"query image {path} not found (leave --image out to link without an image)")
    if path.is_dir():
        raise ValueError(f"query image {path} is a directory: pass an image file")
    if not path.is_file():  # reading a FIFO would wait for a writer; a device never ends
        raise ValueError(f"query image {path} is not a regular file (a FIFO, socket or device): pass an image file")
    return path


def check_text(name: str, text: str) -> str:
    """``text`` unless it holds characters UTF-8 cannot encode: arguments in another encoding reach
    Python as lone surrogates (its surrogateescape), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        byte = f"byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character {ord(bad):#06x}"
        raise ValueError(f"{name} is not valid UTF-8 text ({byte} at character {err.start}): pass it in UTF-8") from None
    return text


class Linker:
    """A loaded export, its collator and the KB's entity cache, ready for queries."""

    def __init__(self, checkpoint: str | Path, shards: str | Path | None = None,
                 device: str | torch.device | None = None, allow_other_kb: bool = False,
                 cache_dtype: str | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.cfg = load_export(self.checkpoint)
        if shards is not None:
            self.cfg.data.shards = str(shards)
        if cache_dtype is not None:
            if cache_dtype not in CACHE_DTYPES:
                raise ValueError(f"cache dtype: expected one of {CACHE_DTYPES}, got {cache_dtype!r}")
            self.cfg.eval.cache_dtype = cache_dtype
        self.folder = ShardFolder.open(self.cfg.data.shards)
        self.shards = self.folder.root
        self.model.to(self.device).eval()
        self.collator = make_collator(self.cfg, self.model)
        check_data_identity(self.checkpoint, self.cfg, allow_other_kb)  # DataMismatch (ValueError) names what differs
        self.store = self.folder.store()
        self.manifest_sha256 = self.folder.sha256
        self.cache_file, self.cache_key = kb_cache_location(self.checkpoint, self.cfg, self.device)
        self.cache_reused = self.cache_saved = False
        self.kb = self._entity_cache().to(self.device)
        self._index = None

    def _entity_cache(self) -> SideCache:
        e = self.cfg.eval
        if e.save_kb_cache:
            cache = load_kb_cache(self.cache_file, self.cache_key)
            if cache is not None and len(cache) == len(self.store):
                self.cache_reused = True
                return cache
        # compat: published computes the entity side on the published blocks, as eval.evaluate does, so
        # both build the same cache under the same key.
        block = e.compat_entity_block if self.model.matcher.settings.published else None
        cache = encode_kb(self.model, self.folder, self.collator, self.device, batch_size=e.batch_size,
                          num_workers=e.num_workers, bf16=e.bf16, distributed=False, block=block)
        cache = compress(cache, e.cache_dtype)  # CacheValueError (a ValueError) names the key
        if e.save_kb_cache:  # a read-only or full checkpoint folder costs the reuse, not the query
            self.cache_saved = save_kb_cache(self.cache_file, cache, self.cache_key, warn=True)
        return cache

    def query_batch(self, sentence: str, mention: str, image: str | Path | None = None, desc: str = "") -> dict:
        """The collated one-mention batch, prepared exactly as training data is."""
        for name, text in (("sentence", sentence), ("mention", mention), ("desc", desc)):
            check_text(name, text)
        jpg = None
        if image is not None:
            path = check_image(image)
            quality = int(self.folder.settings.get("jpeg_quality", 90))
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
        return score_against_kb(self.model.matcher, q, self.kb, self.cfg.eval.max_pair_elements, self.cfg.eval.bf16)[0]

    def _two_stage(self, q: SideCache, top_k: int) -> tuple[Tensor, Tensor]:
        """FAISS retrieves max(top_k, eval.top_k) candidates; the full matcher re-ranks them."""
        if self._index is None:
            self._index = kb_index(self.model.matcher, self.kb, self.cfg.eval.index, rows=1,
                                   nlist=self.cfg.eval.ivf_lists, nprobe=self.cfg.eval.nprobe)
        k = min(max(top_k, self.cfg.eval.top_k), len(self.kb))
        vector = self.model.matcher.separable_vectors(q)
        if not bool(torch.isfinite(vector).all()):
            raise NonFiniteScoreError("the model gives the query a NaN or infinite vector (are the weights finite?)", [0])
        _, cand = search(self._index, vector, k)
        cand = cand[0][cand[0] >= 0].to(self.device)  # FAISS pads with -1 when it finds fewer
        with torch.no_grad(), autocast_for(self.device, self.cfg.eval.bf16):
            scores = self.model.matcher.score_candidates(q, expand(self.kb.select(cand)))["overall"][0].float()
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
         device: str | torch.device | None = None, allow_other_kb: bool = False,
         cache_dtype: str | None = None) -> list[LinkResult]:
    """Top-k KB entities for one mention (see the module docstring); builds or reuses the KB cache."""
    if image is not None:
        check_image(image)  # before loading the model and encoding the KB
    return Linker(checkpoint, shards, device, allow_other_kb, cache_dtype).query(sentence, mention, image, desc, top_k, mode)


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
    p.add_argument("--cache-dtype", choices=CACHE_DTYPES, help="entity cache storage (default: the export's eval.cache_dtype)")
    p.add_argument("--allow-other-kb", action="store_true",
                   help="link against a KB other than the one the export was trained on (the tokenizer must still match)")
    a = p.parse_args(argv)
    try:
        for flag in ("sentence", "mention", "desc"):  # before loading the model and encoding the KB
            check_text(f"--{flag}", getattr(a, flag))
        if a.image is not None:
            check_image(a.image)
        linker = Linker(a.checkpoint, a.shards, a.device, a.allow_other_kb, a.cache_dtype)
        results = linker.query(a.sentence, a.mention, a.image, a.desc, a.top_k, a.mode)
    except COMMAND_ERRORS as err:
        line = error_line(err)
    else:
        line = None
    if line is not None:
        exit_with(line)  # outside the except block: see its docstring
    state = "reused" if linker.cache_reused else "built"
    where = linker.cache_file if linker.cache_reused or linker.cache_saved else "in memory only"
    print(f"KB {linker.shards} ({len(linker.kb)} entities), entity cache {state}: {where}")
    print(format_results(results))


if __name__ == "__main__":
    main()
