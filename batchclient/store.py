"""Durable job store: items with a NULL result until done, cursor pagination, dead letters.

``SqliteJobStore`` (WAL) implements the small ``JobStore`` protocol so another database
could be added. Results are committed after every batch and written only where the result
is still NULL, so a restart skips everything done and a result is never written twice.
Transient SQLite errors (locked, I/O) are retried with backoff.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from batchclient.policy.engine import InputError, ItemResult
from batchclient.policy.state import Accepted
from batchclient.policy.tokens import canonical_id
from batchclient.policy.wire import Item

T = TypeVar("T")

# No index on pending rows: pages walk the rowid (seq) from the cursor, and a partial index
# on "result IS NULL AND state = 'pending'" cost an index delete on every saved row (about
# a fifth of the row update). Stores made with it lose it when opened.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    canon TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    tag TEXT,
    result TEXT,
    label TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    model TEXT,
    provider TEXT
);
DROP INDEX IF EXISTS items_pending;
"""

_DONE_BY_SEQ = ("UPDATE items SET result = ?, label = ?, state = 'done', error = NULL, "
                "attempts = ?, cost_usd = ?, model = ?, provider = ? "
                "WHERE seq = ? AND result IS NULL")
_DONE_BY_ID = _DONE_BY_SEQ.replace("WHERE seq =", "WHERE item_id =")
_DEAD_BY_SEQ = ("UPDATE items SET state = 'dead', error = ?, attempts = ?, model = ?, "
                "provider = ? WHERE seq = ? AND result IS NULL")
_DEAD_BY_ID = _DEAD_BY_SEQ.replace("WHERE seq =", "WHERE item_id =")

# Items of a page are built through their slot descriptors: the frozen dataclass's
# __init__ pays an object.__setattr__ per field (about twice the cost), and rows from our
# own table need none of its checks.
_new_item = object.__new__
_set_id: Any = Item.__dict__["id"].__set__
_set_text: Any = Item.__dict__["text"].__set__
_set_tag: Any = Item.__dict__["tag"].__set__


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """Items in the store by state; ``total = done + dead + pending``."""

    total: int
    done: int
    dead: int
    pending: int
    cost_usd: float


class JobStore(Protocol):
    """What the runner needs of a job store."""

    def import_items(self, items: Iterable[Item]) -> int:
        """Add items (idempotent for identical ones); return how many were new."""
        ...

    def page(self, after_seq: int, limit: int) -> list[tuple[int, Item]]:
        """Up to ``limit`` pending items with ``seq > after_seq``, in seq order."""
        ...

    def save_results(self, results: Sequence[ItemResult | Accepted],
                     seqs: Mapping[str, int] | None = None,
                     labels: Mapping[str, str] | None = None) -> int:
        """Commit one batch of results; return how many rows changed. ``seqs`` may map
        item ids to the ``seq`` their ``page`` gave them (a faster update). An ``Accepted``
        entry (``Engine.drain_compact``) stands for the ``done`` items of one reply, their
        codes named by ``labels``."""
        ...

    def counts(self) -> StoreCounts:
        """Counts by state."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


def _accepted_rows(accepted: Accepted, labels: Mapping[str, str], seqs: Mapping[str, int],
                   by_seq: list[tuple[object, ...]], by_id: list[tuple[object, ...]]) -> None:
    """The ``done`` rows of one reply's items, as ``ItemResult`` would give them."""
    call, share, codes = accepted.call, accepted.share, accepted.codes
    model, provider = call.model, call.provider
    for state in accepted.states:
        item_id = state.id
        code = codes[item_id]
        seq = seqs.get(item_id)
        if seq is None:
            by_id.append((code, labels[code], state.attempts + 1, share, model, provider,
                          item_id))
        else:
            by_seq.append((code, labels[code], state.attempts + 1, share, model, provider, seq))


class SqliteJobStore:
    """SQLite job store in WAL mode (one connection; ``retries`` on transient errors)."""

    def __init__(self, path: str, retries: int = 6, base_delay_s: float = 0.05) -> None:
        self.path = path
        self.retries = retries
        self.base_delay_s = base_delay_s
        self._rng = random.Random(0)
        self._conn = self._retry(self._connect)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return conn

    def _retry(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except sqlite3.OperationalError:
                if attempt >= self.retries:
                    raise
                # Full jitter, wall seconds: the database is a local resource.
                time.sleep(self._rng.uniform(0, self.base_delay_s * 2 ** attempt))
        raise AssertionError("unreachable")

    def import_items(self, items: Iterable[Item]) -> int:
        """Insert items in chunks; an id already present with another text is InputError."""
        added = 0
        chunk: list[Item] = []

        def flush() -> int:
            def run() -> int:
                conn = self._conn
                new = 0
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for item in chunk:
                        canon = canonical_id(item.id)
                        row = conn.execute("SELECT item_id, text FROM items WHERE canon = ?",
                                           (canon,)).fetchone()
                        if row is not None:
                            if row[0] != item.id or row[1] != item.text:
                                raise InputError(f"item {item.id!r}: id collides with stored "
                                                 f"item {row[0]!r}")
                            continue
                        conn.execute("INSERT INTO items(item_id, canon, text, tag) "
                                     "VALUES (?, ?, ?, ?)", (item.id, canon, item.text, item.tag))
                        new += 1
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                return new

            return self._retry(run)

        for item in items:
            chunk.append(item)
            if len(chunk) >= 5000:
                added += flush()
                chunk = []
        if chunk:
            added += flush()
        return added

    def page(self, after_seq: int, limit: int) -> list[tuple[int, Item]]:
        """Cursor pagination: ``WHERE result IS NULL AND seq > ? ORDER BY seq LIMIT ?``."""
        rows = self._retry(lambda: self._conn.execute(
            "SELECT seq, item_id, text, tag FROM items WHERE result IS NULL AND "
            "state = 'pending' AND seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall())
        # TEXT columns come back as str: no conversion per row.
        new, set_id, set_text, set_tag = _new_item, _set_id, _set_text, _set_tag
        out: list[tuple[int, Item]] = []
        append = out.append
        for seq, item_id, text, tag in rows:
            item = new(Item)
            set_id(item, item_id)
            set_text(item, text)
            set_tag(item, tag)
            append((seq, item))
        return out

    def save_results(self, results: Sequence[ItemResult | Accepted],
                     seqs: Mapping[str, int] | None = None,
                     labels: Mapping[str, str] | None = None) -> int:
        """One transaction per batch; a row is only written while its result is NULL.

        Rows whose id ``seqs`` maps (from ``page``) are updated by their integer ``seq``
        (the rowid: no lookup in the item_id index), the others by item_id. An
        ``Accepted`` entry is written straight from the engine's record of the reply (no
        ``ItemResult`` per item); ``labels`` (code -> label) is then required.
        """
        if not results:
            return 0
        by_seq = seqs if seqs is not None else {}
        done_seq: list[tuple[object, ...]] = []
        done_id: list[tuple[object, ...]] = []
        dead_seq: list[tuple[object, ...]] = []
        dead_id: list[tuple[object, ...]] = []
        for r in results:
            if type(r) is Accepted:
                if labels is None:
                    raise ValueError("save_results: Accepted entries need labels")
                _accepted_rows(r, labels, by_seq, done_seq, done_id)
                continue
            assert isinstance(r, ItemResult)
            seq = by_seq.get(r.item_id)
            if r.state == "done":
                row: tuple[object, ...] = (r.code, r.label, r.attempts, r.cost_usd, r.model,
                                           r.provider, r.item_id if seq is None else seq)
                (done_id if seq is None else done_seq).append(row)
            else:
                row = (r.error, r.attempts, r.model, r.provider,
                       r.item_id if seq is None else seq)
                (dead_id if seq is None else dead_seq).append(row)

        def run() -> int:
            conn = self._conn
            changed = 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                for rows, sql in ((done_seq, _DONE_BY_SEQ), (done_id, _DONE_BY_ID),
                                  (dead_seq, _DEAD_BY_SEQ), (dead_id, _DEAD_BY_ID)):
                    if rows:
                        changed += conn.executemany(sql, rows).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return changed

        return self._retry(run)

    def requeue_dead(self) -> int:
        """Put dead-lettered items back to pending (after fixing their cause)."""
        cur = self._retry(lambda: self._conn.execute(
            "UPDATE items SET state = 'pending' WHERE state = 'dead' AND result IS NULL"))
        return cur.rowcount

    def counts(self) -> StoreCounts:
        """Counts by state and the total cost recorded on done items."""
        row = self._retry(lambda: self._conn.execute(
            "SELECT COUNT(*), SUM(state = 'done'), SUM(state = 'dead'), "
            "SUM(result IS NULL AND state = 'pending'), COALESCE(SUM(cost_usd), 0) "
            "FROM items").fetchone())
        return StoreCounts(int(row[0]), int(row[1] or 0), int(row[2] or 0), int(row[3] or 0),
                           float(row[4]))

    def results(self) -> dict[str, tuple[str, str | None, str | None]]:
        """Every item's (state, code, error), for reports and tests."""
        rows = self._retry(lambda: self._conn.execute(
            "SELECT item_id, state, result, error FROM items").fetchall())
        return {str(r[0]): (str(r[1]), r[2], r[3]) for r in rows}

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
