"""Candidate descriptions of a mention: WikiData-style rows whose label or alias matches it.

The table is JSONL, one row per item: ``{"qid", "label", "aliases", "description"}``. Matching is
on a normalised form (casefold, accents stripped through NFKD, punctuation removed, spaces
collapsed): label matches first, then alias matches, in table order, one candidate per QID. When
nothing matches exactly, a fuzzy fallback compares the mention with the labels (difflib ratio,
also on sorted tokens); the labels are blocked by character trigrams in a compact numpy index
built on first use, so a lookup in a million-row table scores a few hundred labels, not all.
Rows without a description are skipped: they have nothing to offer the mention text.

Only the mention's surface form is looked at; the gold answer never is.
"""

from __future__ import annotations

import difflib
import json
import string
import time
import unicodedata
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.reader import DatasetFormatError

_DELETE = {"'", "\u2019", "\u2018", ".", "\u00b7"}  # "O'Brien" -> "obrien", "U.S." -> "us"
# The same mapping for ASCII text, as one str.translate table (the common case, ~10x faster).
_ASCII = {c: " " for c in [*range(32), 127, *map(ord, string.punctuation)]} | {ord("'"): None, ord("."): None}


def normalise(text: str) -> str:
    """Casefold, strip accents (NFKD), turn punctuation and symbols into spaces, collapse spaces."""
    if text.isascii():
        return " ".join(text.lower().translate(_ASCII).split())
    out = []
    for ch in unicodedata.normalize("NFKD", text.casefold()):
        if unicodedata.combining(ch):
            continue
        if ch in _DELETE:
            continue
        cat = unicodedata.category(ch)
        out.append(" " if cat[0] in "PSZC" else ch)
    return " ".join("".join(out).split())


def similarity(a: str, b: str) -> float:
    """Best of the character ratio and the ratio of the sorted tokens (word order ignored)."""
    plain = difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    sa, sb = " ".join(sorted(a.split())), " ".join(sorted(b.split()))
    if (sa, sb) == (a, b):
        return plain
    return max(plain, difflib.SequenceMatcher(None, sa, sb, autojunk=False).ratio())


def _trigrams(key: str) -> set[str]:
    padded = f" {key} "
    return {padded[i:i + 3] for i in range(len(padded) - 2)}


@dataclass(frozen=True)
class Candidate:
    qid: str
    label: str
    description: str
    match: str  # label | alias | fuzzy
    score: float = 1.0


@dataclass
class CandidateSettings:
    max_candidates: int = 10  # cap per mention
    use_aliases: bool = True
    fuzzy: bool = True  # fall back to fuzzy label matching when nothing matches exactly
    fuzzy_threshold: float = 0.85  # least similarity (0..1) of a fuzzy match
    fuzzy_pool: int = 256  # labels scored per fuzzy lookup (those sharing the most trigrams)
    fuzzy_postings: int = 200_000  # budget of trigram postings read per fuzzy lookup (rarest trigrams first)

    def validate(self) -> None:
        if self.max_candidates < 1:
            raise ValueError("candidates.max_candidates must be >= 1")
        if not 0.0 < self.fuzzy_threshold <= 1.0:
            raise ValueError("candidates.fuzzy_threshold must lie in (0, 1]")
        if self.fuzzy_pool < 1 or self.fuzzy_postings < 1:
            raise ValueError("candidates.fuzzy_pool and candidates.fuzzy_postings must be >= 1")


class _Index:
    """Normalised key -> row numbers; a single row is stored as a bare int (a million rows, little memory)."""

    def __init__(self) -> None:
        self.map: dict[str, int | list[int]] = {}

    def add(self, key: str, row: int) -> None:
        old = self.map.get(key)
        if old is None:
            self.map[key] = row
        elif isinstance(old, int):
            if old != row:
                self.map[key] = [old, row]
        elif old[-1] != row:
            old.append(row)

    def get(self, key: str) -> list[int]:
        rows = self.map.get(key)
        if rows is None:
            return []
        return [rows] if isinstance(rows, int) else rows


class _TrigramIndex:
    """Character-trigram postings over the distinct label keys, as CSR numpy arrays."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.gram_ids: dict[str, int] = {}
        grams, owners = array("i"), array("i")
        for k, key in enumerate(keys):
            for g in _trigrams(key):
                grams.append(self.gram_ids.setdefault(g, len(self.gram_ids)))
                owners.append(k)
        g = np.frombuffer(grams, dtype=np.int32) if grams else np.zeros(0, np.int32)
        o = np.frombuffer(owners, dtype=np.int32) if owners else np.zeros(0, np.int32)
        order = np.argsort(g, kind="stable")
        self.owners = o[order]
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(g, minlength=len(self.gram_ids)))]).astype(np.int64)

    def pool(self, key: str, size: int, budget: int) -> list[int]:
        """Keys sharing the most trigrams with ``key`` (at most ``size``), reading the rarest postings first."""
        ids = [self.gram_ids[g] for g in _trigrams(key) if g in self.gram_ids]
        if not ids:
            return []
        ids.sort(key=lambda i: self.offsets[i + 1] - self.offsets[i])
        parts, read = [], 0
        for i in ids:
            n = int(self.offsets[i + 1] - self.offsets[i])
            if parts and read + n > budget:
                break
            parts.append(self.owners[self.offsets[i]:self.offsets[i + 1]])
            read += n
        found, counts = np.unique(np.concatenate(parts), return_counts=True)
        if len(found) > size:
            keep = np.argpartition(-counts, size - 1)[:size]
            found = found[np.sort(keep)]
        return found.tolist()


class CandidateTable:
    """The candidate table in memory with its label/alias indexes; ``lookup`` gives a mention's candidates."""

    def __init__(self, settings: CandidateSettings | None = None) -> None:
        self.settings = settings or CandidateSettings()
        self.settings.validate()
        self.qids: list[str] = []
        self.labels: list[str] = []
        self.descriptions: list[str] = []
        self.by_label = _Index()
        self.by_alias = _Index()
        self.skipped_no_description = 0
        self.load_seconds = 0.0
        self.fuzzy_index_seconds = 0.0
        self._fuzzy: _TrigramIndex | None = None

    @classmethod
    def from_rows(cls, rows: list[dict] | Iterator[dict], settings: CandidateSettings | None = None) -> CandidateTable:
        table = cls(settings)
        for row in rows:
            table.add(row)
        return table

    @classmethod
    def load(cls, path: Path, settings: CandidateSettings | None = None) -> CandidateTable:
        """Read a JSONL table; a malformed line is an error naming file and line."""
        start = time.perf_counter()
        table = cls(settings)
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetFormatError(f"{path}: line {line_no}: malformed JSON: {err.msg}") from None
                try:
                    table.add(row)
                except ValueError as err:
                    raise DatasetFormatError(f"{path}: line {line_no}: {err}") from None
        table.load_seconds = time.perf_counter() - start
        return table

    def add(self, row: dict) -> None:
        if not isinstance(row, dict) or not isinstance(row.get("qid"), str) or not isinstance(row.get("label"), str):
            raise ValueError("a row needs string fields 'qid' and 'label'")
        desc = row.get("description") or ""
        if not isinstance(desc, str):
            raise ValueError("'description' must be a string")
        if not desc.strip():
            self.skipped_no_description += 1
            return
        aliases = row.get("aliases") or []
        if not isinstance(aliases, list):
            raise ValueError("'aliases' must be a list of strings")
        r = len(self.qids)
        self.qids.append(row["qid"])
        self.labels.append(row["label"])
        self.descriptions.append(desc.strip())
        label_key = normalise(row["label"])
        if label_key:
            self.by_label.add(label_key, r)
        if self.settings.use_aliases:
            for alias in aliases:
                key = normalise(alias) if isinstance(alias, str) else ""
                if key and key != label_key:
                    self.by_alias.add(key, r)
        self._fuzzy = None

    def __len__(self) -> int:
        return len(self.qids)

    def _candidate(self, row: int, match: str, score: float = 1.0) -> Candidate:
        return Candidate(self.qids[row], self.labels[row], self.descriptions[row], match, score)

    def lookup(self, mention: str) -> list[Candidate]:
        """Candidates of a surface form, best first, at most ``max_candidates``, one per QID."""
        s = self.settings
        key = normalise(mention)
        if not key:
            return []
        out: list[Candidate] = []
        seen: set[str] = set()
        for rows, match in ((self.by_label.get(key), "label"), (self.by_alias.get(key), "alias")):
            for r in rows:
                if self.qids[r] not in seen:
                    seen.add(self.qids[r])
                    out.append(self._candidate(r, match))
                    if len(out) >= s.max_candidates:
                        return out
        if out or not s.fuzzy:
            return out
        for label_key, score in self.fuzzy_labels(key):
            for r in self.by_label.get(label_key):
                if self.qids[r] not in seen:
                    seen.add(self.qids[r])
                    out.append(self._candidate(r, "fuzzy", score))
                    if len(out) >= s.max_candidates:
                        return out
        return out

    def fuzzy_labels(self, key: str) -> list[tuple[str, float]]:
        """Normalised labels similar to ``key`` (>= fuzzy_threshold), most similar first."""
        if self._fuzzy is None:
            start = time.perf_counter()
            self._fuzzy = _TrigramIndex(list(self.by_label.map))
            self.fuzzy_index_seconds += time.perf_counter() - start
        s = self.settings
        scored = []
        for k in self._fuzzy.pool(key, s.fuzzy_pool, s.fuzzy_postings):
            label_key = self._fuzzy.keys[k]
            score = similarity(key, label_key)
            if score >= s.fuzzy_threshold:
                scored.append((-score, k, label_key))
        scored.sort()
        return [(label_key, -neg) for neg, _, label_key in scored]
