"""On-disk cache of selections: SQLite, one row per (mention, sentence, candidate set, selector).

Each batch of results is committed in one transaction, so an interrupted run keeps every finished
batch and never a half-written one; a re-run asks the selector only about what is missing. Only
decisions (a chosen candidate) are kept: a fallback row (no choice, as earlier versions stored
unparsable and out-of-range replies) reads as missing, so a re-run against a fixed server asks again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_shards.dme.candidates import Candidate


def cache_key(selector_id: str, mention: str, sentence: str, candidates: Sequence[Candidate]) -> str:
    payload = [selector_id, mention, sentence, [[c.qid, c.description] for c in candidates]]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


class ChoiceCache:
    """key -> (chosen candidate index, reason). ``path=None`` keeps nothing (cache disabled)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS choices (key TEXT PRIMARY KEY, choice INTEGER, reason TEXT NOT NULL)")
            self.conn.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[int | None, str]]:
        if self.conn is None:
            return {}
        keys = list(dict.fromkeys(keys))
        out: dict[str, tuple[int | None, str]] = {}
        for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            part = keys[i:i + 500]
            rows = self.conn.execute(f"SELECT key, choice, reason FROM choices WHERE choice IS NOT NULL AND key IN "
                                     f"({','.join('?' * len(part))})", part)
            out.update({k: (c, r) for k, c, r in rows})
        return out

    def put_many(self, items: Iterable[tuple[str, int | None, str]]) -> None:
        if self.conn is None:
            return
        with self.conn:  # one transaction: all or nothing
            self.conn.executemany("INSERT OR REPLACE INTO choices (key, choice, reason) VALUES (?, ?, ?)", list(items))

    def __len__(self) -> int:
        if self.conn is None:
            return 0
        return int(self.conn.execute("SELECT COUNT(*) FROM choices WHERE choice IS NOT NULL").fetchone()[0])

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
