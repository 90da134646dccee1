"""Result cache keyed on normalised input + task + model (SQLite), shared across jobs.

A duplicate, inside a job or across jobs, is answered from here and never sent again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Protocol

from batchclient.policy.engine import ItemResult


class ResultCache(Protocol):
    """Lookup and store of codes by cache key."""

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Codes of the keys present."""
        ...

    def put_many(self, results: Sequence[ItemResult]) -> None:
        """Remember the codes of done results."""
        ...


class SqliteResultCache:
    """The result cache in one SQLite file (WAL, so several jobs may share it)."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, "
                           "code TEXT NOT NULL, model TEXT)")

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Codes of the keys present (queried 500 at a time)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for key, code in self._conn.execute(
                    f"SELECT key, code FROM cache WHERE key IN ({marks})", chunk):
                found[str(key)] = str(code)
        return found

    def put_many(self, results: Sequence[ItemResult]) -> None:
        """Insert the done results that carry a cache key (first writer wins)."""
        self.put_codes([(r.cache_key, r.code, r.model) for r in results
                        if r.state == "done" and r.cache_key and r.code])

    def put_codes(self, rows: Sequence[tuple[str, str, str | None]]) -> None:
        """Insert (key, code, model) rows (first writer wins)."""
        if rows:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR IGNORE INTO cache VALUES (?, ?, ?)", rows)
            self._conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
