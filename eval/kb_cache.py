"""The compact entity cache: stored in fp32, bf16, fp16 or int8, saved next to a checkpoint and
memory-mapped back.

The entity side of the matcher (``moe.features.SideCache``, one row per KB entity) is computed
once and scored against every mention. At WikiMEL size its fp32 ``*.query`` tensors alone take
gigabytes, so it can be kept in a smaller dtype (:func:`compress`) and turned back into floats one
scored block at a time (:func:`expand`). ``int8`` quantises each row of the last dimension (one
token vector or one global vector) symmetrically with its own fp32 scale, stored under
``NAME@scale``; every stored tensor keeps the entity row as its first dimension, so ``slice``,
``select`` and ``cat`` work on a compressed cache unchanged.

:func:`save_kb_cache` writes a flat dict of tensors plus metadata atomically, with a sha256 digest of
every tensor's raw bytes (one per block of :data:`DIGEST_BLOCK` bytes); :func:`load_kb_cache`
memory-maps it, checks every digest at open (this reads the whole file once, which scoring does
anyway; blocks are hashed on several threads) and returns None, with one line on stderr, for a file
that is missing, damaged (unreadable, or bytes that differ from their digest), of another version or
of another :func:`cache_key`: the caller then encodes the KB again, never scores a damaged cache.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from core.atomic import atomic_path
from core.cli import disk_full
from core.hashing import file_sha256
from data_shards.folder import ShardFolder
from model.config import CACHE_DTYPES, Config, to_dict
from model.export import EXPORT_WEIGHTS
from moe.features import SideCache
from moe.matcher import MMoEMatcher

__all__ = ["CACHE_DTYPES", "CACHE_VERSION", "CacheValueError", "cache_bytes", "cache_device", "cache_dtype_of",
           "cache_key", "cache_path", "compress", "expand", "index_vectors", "load_kb_cache", "save_kb_cache",
           "tensor_digests"]

CACHE_VERSION = 2  # 2: tensor digests (version 1 files have none and are rebuilt)
SCALE = "@scale"  # suffix of an int8 tensor's scale; the matcher's keys are "unit.field", never with "@"
SIDE, META = "side.", "meta."
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
CHUNK_ELEMENTS = 1 << 20  # rows are converted in chunks of about this many values: small temporaries, reused
DIGEST = META + "sha256"  # {stored tensor name: [sha256 hex of each DIGEST_BLOCK bytes of its data]}, as JSON text
DIGEST_BLOCK = 64 << 20  # bytes per digest: blocks are hashed in parallel (hashlib releases the GIL)


class CacheValueError(ValueError):
    """The cache cannot be stored in the asked dtype without hiding a value (NaN, inf, fp16 overflow)."""


def _chunks(t: Tensor):
    per_row = max(1, t[0].numel()) if len(t) else 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    for a in range(0, len(t), step):
        yield a, min(a + step, len(t))


def _quantize(name: str, t: Tensor) -> tuple[Tensor, Tensor]:
    q = torch.empty(t.shape, dtype=torch.int8, device=t.device)
    scale = torch.empty((*t.shape[:-1], 1), dtype=torch.float32, device=t.device)
    for a, b in _chunks(t):
        x = t[a:b].float()
        peak = x.abs().amax(dim=-1, keepdim=True)  # NaN and inf propagate into the row's peak
        _check_finite(name, peak)
        s = peak / 127
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: scale 1, values 0
        q[a:b] = torch.round(x / s).clamp_(-127, 127).to(torch.int8)
        scale[a:b] = s
    return q, scale


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise CacheValueError(f"entity cache key {name!r} holds NaN or inf values; a compact cache would hide them "
                              "(are the weights finite? a diverged run?)")


def _cast(name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    limit = torch.finfo(dtype).max
    for a, b in _chunks(t):
        x = t[a:b]
        if x.numel():
            lo, hi = torch.aminmax(x)  # one pass; NaN and inf propagate into the extremes
            _check_finite(name, torch.stack([lo, hi]))
            peak = max(-float(lo), float(hi))
        else:
            peak = 0.0
        if peak > limit:  # would become inf in this dtype
            raise CacheValueError(f"entity cache key {name!r}: max |value| {peak:.6g} exceeds the {dtype} range "
                                  f"({limit:.6g}); use eval.cache_dtype bfloat16, int8 or float32")
        out[a:b] = x
    return out


def compress(cache: SideCache, dtype: str) -> SideCache:
    """``cache`` with its floating tensors stored as ``dtype`` (one of CACHE_DTYPES); bool and integer
    tensors unchanged. float32 is stored as is (no copy): nothing is rounded, so nothing is hidden, and
    the scorer reports non-finite scores per mention. Other dtypes raise CacheValueError on NaN/inf
    and on values beyond the dtype's range, naming the key."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"cache dtype: expected one of {CACHE_DTYPES}, got {dtype!r}")
    target = TORCH_DTYPES[dtype]
    floats = [t for k, t in cache.tensors.items() if t.is_floating_point()]
    if any(k.endswith(SCALE) for k in cache.tensors):
        raise ValueError("compress: the cache is already int8; expand it first")
    if dtype == "float32" and all(t.dtype == torch.float32 for t in floats):
        return cache
    out: dict[str, Tensor] = {}
    for name, t in cache.tensors.items():
        if not t.is_floating_point():
            out[name] = t
        elif dtype == "int8":
            out[name], out[name + SCALE] = _quantize(name, t)
        else:
            out[name] = _cast(name, t, target)
    return SideCache(out)


def expand(block: SideCache, dtype: torch.dtype = torch.float32) -> SideCache:
    """A (block of a) compressed cache as floating tensors of ``dtype``: int8 values times their
    scale, scale keys dropped. A cache already in ``dtype`` is returned itself (no copy)."""
    t = block.tensors
    if not any(k.endswith(SCALE) for k in t) and all(v.dtype == dtype for v in t.values() if v.is_floating_point()):
        return block
    out: dict[str, Tensor] = {}
    for name, v in t.items():
        if name.endswith(SCALE):
            continue
        if v.dtype == torch.int8 and name + SCALE in t:
            out[name] = (v.to(torch.float32) * t[name + SCALE]).to(dtype)
        elif v.is_floating_point():
            out[name] = v.to(dtype)
        else:
            out[name] = v
    return SideCache(out)


def index_vectors(matcher: MMoEMatcher, kb: SideCache) -> Tensor:
    """``matcher.separable_vectors`` of a (compressed) KB cache. They read only per-entity vectors
    (globals and cross vectors, [N, D]), so only tensors of at most two dimensions are expanded:
    never the whole KB's per-token ``*.query`` tensors (an int8 tensor's scale has its dimensions)."""
    small = {k: v for k, v in kb.tensors.items() if v.dim() <= 2}
    return matcher.separable_vectors(expand(SideCache(small)))


def cache_device(cache: SideCache) -> torch.device:
    return next(iter(cache.tensors.values())).device


def cache_bytes(cache: SideCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.tensors.values())


def cache_dtype_of(cache: SideCache) -> str:
    """The CACHE_DTYPES name a cache is stored in (its floating tensors' dtype, or int8)."""
    if any(k.endswith(SCALE) for k in cache.tensors):
        return "int8"
    names = {v: k for k, v in TORCH_DTYPES.items()}
    dtypes = {t.dtype for t in cache.tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in names:
        raise ValueError(f"entity cache holds floating tensors of {sorted(map(str, dtypes))}, not one cache dtype")
    return names[dtypes.pop()]


def cache_key(checkpoint: str | Path, cfg: Config, *, autocast: bool) -> str:
    """sha256 (hex) over everything the saved entity cache depends on: the KB (manifest sha256), the
    exported weights (sha256 of their file: a re-export with the same mtime still differs), the model
    and data config sections (``data.shards`` left out: the manifest hash identifies the data, not
    its path), whether bf16 autocast computed it (``autocast``: ``eval.ranking.autocast_for`` was
    active), the cache dtype and CACHE_VERSION. Under ``compat: published`` the entity side depends
    on its block of KB rows, so ``eval.compat_entity_block`` is part of the key too."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "shards"}
    parts = {
        "version": CACHE_VERSION,
        "manifest_sha256": ShardFolder.open(cfg.data.shards).sha256,
        "weights_sha256": file_sha256(Path(checkpoint) / EXPORT_WEIGHTS),
        "model": to_dict(cfg.model),
        "data": data,
        "bf16_autocast": bool(autocast),
        "cache_dtype": cfg.eval.cache_dtype,
    }
    if cfg.model.matcher.published:
        parts["compat_entity_block"] = cfg.eval.compat_entity_block
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_path(checkpoint: str | Path, key: str, rows: tuple[int, int] | None = None) -> Path:
    """Where the entity cache of ``key`` lives in a checkpoint folder; ``rows``: the file of one slice of it
    (a KB sharded across ranks, eval/sharded.py)."""
    part = "" if rows is None else f".rows{rows[0]}-{rows[1]}"
    return Path(checkpoint) / f"kb_cache-{key[:16]}{part}.pt"


def slice_key(key: str, rows: tuple[int, int]) -> str:
    """The key a slice's file is saved under: the whole cache's key and the slice's rows."""
    return f"{key}:rows{rows[0]}-{rows[1]}"


def _text(s: str) -> Tensor:
    return torch.tensor(list(s.encode()), dtype=torch.uint8)


def _read_text(t: object) -> str | None:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        return None
    return bytes(t.tolist()).decode(errors="replace")


def _raw_bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (memory-mapped or not), without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _block_sha256(job: tuple[memoryview, int]) -> str:
    data, start = job
    return hashlib.sha256(data[start:start + DIGEST_BLOCK]).hexdigest()


def tensor_digests(data: dict[str, Tensor], threads: int | None = None) -> dict[str, list[str]]:
    """sha256 hex of each DIGEST_BLOCK bytes of each tensor in ``data`` (contiguous, on the CPU)."""
    names, jobs = [], []
    for name, t in data.items():
        raw = _raw_bytes(t)
        for start in range(0, max(len(raw), 1), DIGEST_BLOCK):  # an empty tensor: one digest of no bytes
            names.append(name)
            jobs.append((raw, start))
    threads = threads or max(1, min(torch.get_num_threads(), 8))
    with ThreadPoolExecutor(threads) as pool:
        hexes = list(pool.map(_block_sha256, jobs))
    out: dict[str, list[str]] = {name: [] for name in data}
    for name, h in zip(names, hexes, strict=True):
        out[name].append(h)
    return out


def save_kb_cache(path: str | Path, cache: SideCache, key: str, warn: bool = False) -> bool:
    """Save ``cache`` under ``key`` with the digests of its tensors: written to a temporary name in the
    same folder, then renamed, so the final name never holds a half-written file. A full disk (torch.save
    names no errno) is OSError ENOSPC. ``warn``: a file that cannot be written (a read-only or full
    folder) costs the reuse, not the command: one warning line on stderr, and False."""
    try:
        _save_kb_cache_file(Path(path), cache, key)
        return True
    except OSError as err:
        if not warn:
            raise
        why = "the disk is full" if disk_full(err) else (err.strerror or str(err))
        print(f"warning: could not save the KB cache to {path} ({why}); going on without it (the KB is encoded "
              "again next time)", file=sys.stderr)
        return False


def _save_kb_cache_file(path: Path, cache: SideCache, key: str) -> None:
    data = {SIDE + k: v.detach().cpu().contiguous() for k, v in cache.tensors.items()}
    data.update({META + "version": torch.tensor(CACHE_VERSION), META + "key": _text(key),
                 META + "rows": torch.tensor(len(cache), dtype=torch.int64), META + "dtype": _text(cache_dtype_of(cache))})
    data[DIGEST] = _text(json.dumps(tensor_digests(data), sort_keys=True))
    try:
        with atomic_path(path) as tmp:
            torch.save(data, tmp)  # by name: torch writes a file name itself
    except RuntimeError as err:
        if not disk_full(err):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None


def digest_mismatch(data: dict[str, Tensor]) -> str | None:
    """Why the tensors of a loaded cache do not match their saved digests (a damaged file), or None."""
    try:
        saved = json.loads(_read_text(data.get(DIGEST)) or "")
    except ValueError:
        return "no readable tensor digest"
    tensors = {k: v for k, v in data.items() if k != DIGEST}
    if not isinstance(saved, dict) or set(saved) != set(tensors):
        return "the tensor digest does not list the file's tensors"
    for name, blocks in tensor_digests(tensors).items():
        want = saved[name]
        if blocks != want:
            where = (f"block {next(i for i, (a, b) in enumerate(zip(blocks, want, strict=True)) if a != b)}"
                     if len(blocks) == len(want) else "the number of blocks")
            return f"tensor {name!r} differs from its sha256 digest ({where} of {DIGEST_BLOCK >> 20} MiB): the file is damaged"
    return None


def load_kb_cache(path: str | Path, key: str, warn: bool = True, verify: bool = True) -> SideCache | None:
    """The cache saved at ``path`` under ``key``, memory-mapped; None (with ``warn``, one line on stderr
    saying why) if the file is missing, unreadable or damaged (with ``verify``: a tensor whose bytes
    differ from their digest), of another version or of another key. Never raises: a bad cache is
    rebuilt. ``verify=False`` only measures what the check costs (bench/bench_kb_cache.py)."""
    path = Path(path)

    def _reject(path: Path, why: str) -> None:
        if warn:
            print(f"KB cache {path}: {why}; encoding the KB", file=sys.stderr)

    if not path.is_file():
        _reject(path, "not found")
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # damaged, truncated, not a torch file: rebuilt, whatever the cause
        _reject(path, f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
        return None
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        _reject(path, "not an entity cache")
        return None
    version = data.get(META + "version")
    if version is None or version.numel() != 1 or int(version) != CACHE_VERSION:
        _reject(path, f"version {None if version is None else version.tolist()}, this code reads {CACHE_VERSION}")
        return None
    if _read_text(data.get(META + "key")) != key:
        _reject(path, "built for another KB, model, config or cache dtype (key differs)")
        return None
    why = digest_mismatch(data) if verify else None
    if why:
        _reject(path, why)
        return None
    side = {k[len(SIDE):]: v for k, v in data.items() if k.startswith(SIDE)}
    try:
        cache = SideCache(side)
        rows = data[META + "rows"]
        ok = bool(side) and len(cache) == int(rows) and cache_dtype_of(cache) == _read_text(data.get(META + "dtype"))
    except (ValueError, KeyError, RuntimeError):
        ok = False
    if not ok:
        _reject(path, "inconsistent contents")
        return None
    return cache
