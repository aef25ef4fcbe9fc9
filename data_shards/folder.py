"""One shards folder (the output of ``python -m data_shards.convert``) and everything read from its manifest.

A :class:`ShardFolder` reads and parses ``manifest.json`` once and takes its sha256 (which identifies the converted
data: the manifest lists every shard's sha256) of the bytes it parsed. It hands out the groups'
shard files (:meth:`ShardFolder.shard_set`), the entity store, the size and sha256 checks of the shards
(:meth:`ShardFolder.problems`, :meth:`ShardFolder.verify`) and the split scans the evaluation slices use,
cached on the object. :meth:`ShardFolder.open` returns the one object of a folder while its manifest is
unchanged: a re-converted folder (another manifest file) is a new object, so nothing stale is served.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from core.hashing import file_sha256
from data_shards.store import EntityStore, ShardError

MANIFEST = "manifest.json"


@dataclass
class ShardSet:
    paths: list[Path]
    file_counts: list[int]  # samples in each shard file
    keep: np.ndarray | None = None  # bool per sample (in file order); None = every sample is used

    def __post_init__(self) -> None:
        self.first = np.cumsum([0, *self.file_counts])  # global index of each shard's first sample
        if self.keep is None:
            self.counts = list(self.file_counts)
        else:
            self.counts = [int(self.keep[a:b].sum()) for a, b in zip(self.first[:-1], self.first[1:], strict=True)]

    def subset(self, fraction: float, seed: int, mode: str = "random") -> ShardSet:
        """round(fraction * N) samples (low-resource training): a seeded random subset, or with
        ``mode="first"`` the first ones in split-file order (MIMIC's 10% / 20% settings)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"data.train_fraction must be in (0, 1], got {fraction}")
        if mode not in ("random", "first"):
            raise ValueError(f"data.train_fraction_mode must be random or first, got {mode!r}")
        if fraction == 1.0:
            return self
        n = sum(self.file_counts)
        keep = np.zeros(n, dtype=bool)
        take = max(1, round(fraction * n))
        if mode == "first":
            keep[:take] = True  # shards hold the split in file order
        else:
            keep[np.random.default_rng([seed, 7919]).permutation(n)[:take]] = True
        return ShardSet(self.paths, self.file_counts, keep)

    @property
    def total(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class FileCheck:
    name: str  # relative to the shards folder
    sha256: str
    size: int | None  # None: not recorded (older manifests)


def problems_message(shard_root: Path | str, problems: list[str]) -> str:
    """The error listing the files that differ from the manifest (the first 20)."""
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return (f"{shard_root}: {len(problems)} file(s) differ from manifest.json:\n  {shown}\n"
            "Convert the dataset again (python -m data_shards.convert) or restore these files.")


def _json_members(paths: list[Path]) -> Iterator[dict]:
    for path in paths:
        for sample in wds.tarfile_samples([{"url": str(path)}], select_files=lambda name: name.endswith(".json")):
            yield json.loads(sample["json"])


def _signature(manifest: Path) -> tuple[int, int, int]:
    """What changes when the manifest file is rewritten (a re-conversion writes a new file)."""
    st = manifest.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


class ShardFolder:
    """A converted shards folder: its manifest, read once, and what is derived from it."""

    _open: OrderedDict[str, ShardFolder] = OrderedDict()  # path as given -> the object open() hands out
    OPEN_MAX = 8

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        if not self.manifest_path.is_file():
            raise FileNotFoundError(f"{self.manifest_path} not found: convert the dataset first (python -m data_shards.convert)")
        self.signature = _signature(self.manifest_path)
        raw = self.manifest_path.read_bytes()
        self.manifest: dict = json.loads(raw)
        # sha256 of manifest.json (the digest core.hashing.file_sha256 gives): it lists every shard's sha256, so it
        # identifies the converted data. Taken of the bytes parsed, so it describes this object's manifest even
        # once the file on disk was rewritten.
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self._facts: dict[str, dict[int, tuple[int, bool, str]]] = {}
        self._golds: dict[tuple[float, int, str], frozenset[int]] = {}

    @classmethod
    def open(cls, root: Path | str) -> ShardFolder:
        """The shared object of the folder at ``root``: the one handed out before while its manifest file is
        unchanged, else a new one (a re-converted folder). The last OPEN_MAX folders are kept, by the path as
        given (so the object's messages name the folder as its caller spelt it)."""
        key = str(Path(root))
        folder = cls._open.get(key)
        path = Path(root) / MANIFEST
        if folder is None or not path.is_file() or _signature(path) != folder.signature:
            folder = cls(root)
        cls._open[key] = folder
        cls._open.move_to_end(key)
        while len(cls._open) > cls.OPEN_MAX:
            cls._open.popitem(last=False)
        return folder

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"ShardFolder({str(self.root)!r})"

    # -- what the manifest says ------------------------------------------------------------------------
    @property
    def dataset(self) -> str | None:
        return self.manifest.get("dataset")

    @property
    def counts(self) -> dict[str, int]:
        """Entities and mentions per split, as converted."""
        return self.manifest["counts"]

    @property
    def groups(self) -> list[str]:
        """The shard groups the folder holds (kb, and the converted splits), sorted."""
        return sorted(self.manifest["shards"])

    @property
    def settings(self) -> dict:
        """The conversion settings (image size, JPEG quality, ...)."""
        return self.manifest.get("settings", {})

    @property
    def entity_index(self) -> Path:
        """The KB's entity index (``kb/index.npy``): shard, offsets and sizes of every entity."""
        return self.root / self.manifest["entity_index"]

    def shard_set(self, group: str) -> ShardSet:
        """The shard files of ``group`` (kb, train, dev, test) with their sample counts."""
        if group not in self.manifest["shards"]:
            raise KeyError(f"{self.root}: no {group!r} shards; the manifest has {sorted(self.manifest['shards'])}")
        entries = self.manifest["shards"][group]
        return ShardSet([self.root / e["name"] for e in entries], [e["samples"] for e in entries])

    def store(self) -> EntityStore:
        """Random access to the KB's entities by id (data_shards/store.py)."""
        return EntityStore(self.root, [self.root / e["name"] for e in self.manifest["shards"]["kb"]],
                           self.entity_index, self.counts["entities"])

    # -- the checks of the shards against the manifest ----------------------------------------------
    def expected_files(self, groups: list[str] | None = None) -> list[FileCheck]:
        """The files of ``groups`` (all when None) with their recorded digests; the KB's index goes with the KB."""
        shards = self.manifest["shards"]
        unknown = sorted(set(groups or []) - set(shards))
        if unknown:
            raise KeyError(f"the manifest has no {unknown} shards (it has {sorted(shards)})")
        files = [FileCheck(e["name"], e["sha256"], e.get("bytes")) for g in (groups or list(shards)) for e in shards[g]]
        if (groups is None or "kb" in groups) and self.manifest.get("entity_index_sha256"):
            files.append(FileCheck(self.manifest["entity_index"], self.manifest["entity_index_sha256"], None))
        return files

    def problems(self, groups: list[str] | None = None, progress: bool = True,
                 part: tuple[int, int] = (0, 1)) -> list[str]:
        """Files of ``groups`` whose size or sha256 differs from the manifest (empty: every file matches).
        ``part=(r, n)`` checks every n-th file from the r-th, so n processes can share the work."""
        root = self.root
        files = self.expected_files(groups)[part[0]::part[1]]
        problems: list[str] = []
        present = [f for f in files if (root / f.name).is_file()]
        total = sum((root / f.name).stat().st_size for f in present)
        with tqdm(total=total, desc=f"verify {root.name}", unit="B", unit_scale=True, disable=not progress or None) as bar:
            for f in files:
                path = root / f.name
                if not path.is_file():
                    problems.append(f"{f.name}: missing")
                    continue
                size = path.stat().st_size
                if f.size is not None and size != f.size:
                    problems.append(f"{f.name}: {size} bytes, the manifest says {f.size}")
                    bar.update(size)
                    continue
                digest = file_sha256(path, on_block=bar.update)
                if digest != f.sha256:
                    problems.append(f"{f.name}: sha256 {digest[:16]}..., the manifest says {f.sha256[:16]}...")
        return problems

    def verify(self, groups: list[str] | None, what: str, *, rank: int = 0, world: int = 1,
               gather: Callable[[list[str]], list[list[str]]] | None = None) -> None:
        """Size and sha256 of the shards of ``groups`` (None: all) against the manifest; raise ShardError listing
        every bad file, ``what`` (how to go on anyway) appended. Under several processes each checks its
        ``rank``-th share of ``world`` and ``gather`` (every rank's list, on every rank) pools them, so every rank
        raises the same error."""
        problems = self.problems(groups, progress=rank == 0, part=(rank, world))
        everything = [p for part in (gather(problems) if gather is not None else [problems]) for p in part]
        if everything:
            raise ShardError(problems_message(self.root, sorted(everything)) + f" ({what})")

    # -- the splits' text, for the evaluation slices ---------------------------------------------------
    def json_members(self, group: str) -> Iterator[dict]:
        """The ``.json`` member of every sample of ``group``, in file order (images are not read)."""
        return _json_members(self.shard_set(group).paths)

    def mention_facts(self, split: str) -> dict[int, tuple[int, bool, str]]:
        """index -> (gold id, has an image, description) of a split's mentions; read once per object."""
        if split not in self._facts:
            self._facts[split] = {int(m["index"]): (int(m["gold_id"]), bool(m["has_image"]), m.get("desc") or "")
                                  for m in self.json_members(split)}
        return self._facts[split]

    def train_golds(self, fraction: float = 1.0, seed: int = 0, mode: str = "random") -> frozenset[int] | None:
        """Gold entity ids of the training mentions (the ``train_fraction`` subset the trainer used: seeded
        random, or the first ones with ``mode="first"``); None without train shards. Read once per object."""
        if "train" not in self.manifest["shards"]:
            return None
        key = (float(fraction), int(seed), mode)
        if key not in self._golds:
            shards = self.shard_set("train")
            if fraction < 1.0:
                shards = shards.subset(fraction, seed, mode)
            golds = set()
            for j, meta in enumerate(_json_members(shards.paths)):
                if shards.keep is None or shards.keep[j]:
                    golds.add(int(meta["gold_id"]))
            self._golds[key] = frozenset(golds)
        return self._golds[key]


def is_shards_folder(root: Path | str) -> bool:
    """Whether ``root`` holds a manifest (a converted folder)."""
    return (Path(root) / MANIFEST).is_file()
