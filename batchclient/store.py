"""Durable job store: item outcomes with a NULL result until done, cursor pagination, dead
letters.

``SqliteJobStore`` (WAL) implements the small ``JobStore`` protocol so another database
could be added. Results are committed after every batch and written only where the result
is still NULL, so a restart skips everything done and a result is never written twice.
Transient SQLite errors (locked, I/O) are retried with backoff.
"""

from __future__ import annotations

import fcntl
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from operator import attrgetter
from typing import Protocol, TypeVar, cast

from batchclient.policy.engine import InputError, ItemResult
from batchclient.policy.state import Accepted
from batchclient.policy.tokens import canonical_id
from batchclient.policy.wire import Item

T = TypeVar("T")

# Schema 2. What was imported (``items``: id, text, tag) is apart from what a run writes
# (``outcomes``: one row per item, its result NULL until done), so a saved row is a narrow
# record of four bound values (result, attempts, batch, seq) rather than a rewrite of the
# item's text and ids with seven (0.64x the instructions of a 20-row transaction). What is
# the same for every item of one reply (its share of the charge, model, provider) is one
# ``batches`` row; ``labels`` names the codes. No index on pending rows: pages walk the
# rowid (seq) from the cursor (a partial index cost an index write on every saved row).
SCHEMA_VERSION = 2
# The one row naming the task a store's results answer (``bind_task``); a schema-2 store
# from before it gets the table when opened.
_JOB_TASK = """CREATE TABLE IF NOT EXISTS job_task (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    model TEXT NOT NULL
)"""
# Whether the last import finished (``import_items`` writes 0 before its first chunk and
# 1 in the transaction of its last): a resume without the items file must not take an
# interrupted import for the whole job. A store from before it has no row: complete.
_JOB_IMPORT = """CREATE TABLE IF NOT EXISTS job_import (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    complete INTEGER NOT NULL
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    canon TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    tag TEXT
);
CREATE TABLE IF NOT EXISTS outcomes (
    seq INTEGER PRIMARY KEY REFERENCES items(seq),
    result TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    batch INTEGER REFERENCES batches(id),
    error TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    cost_usd_each REAL NOT NULL DEFAULT 0,
    model TEXT,
    provider TEXT
);
CREATE TABLE IF NOT EXISTS labels (
    code TEXT PRIMARY KEY,
    label TEXT
);
{_JOB_TASK};
{_JOB_IMPORT};
CREATE VIEW IF NOT EXISTS item_results AS
    SELECT i.seq, i.item_id, i.text, i.tag, o.result, l.label, o.state, o.error, o.attempts,
           COALESCE(b.cost_usd_each, 0) AS cost_usd, b.model, b.provider
    FROM items i JOIN outcomes o ON o.seq = i.seq
    LEFT JOIN batches b ON b.id = o.batch LEFT JOIN labels l ON l.code = o.result;
"""

# A store of schema 1 (one wide ``items`` table with the result columns) is moved to
# schema 2 in one transaction when opened: a kill during it leaves schema 1 intact.
_MIGRATE_1 = """
ALTER TABLE items RENAME TO items_v1;
{schema}
INSERT INTO items(seq, item_id, canon, text, tag)
    SELECT seq, item_id, canon, text, tag FROM items_v1;
INSERT INTO batches(id, cost_usd_each, model, provider)
    SELECT seq, cost_usd, model, provider FROM items_v1
    WHERE state != 'pending' OR result IS NOT NULL;
INSERT INTO outcomes(seq, result, state, attempts, batch, error)
    SELECT seq, result, state, attempts,
           CASE WHEN state != 'pending' OR result IS NOT NULL THEN seq END, error
    FROM items_v1;
INSERT OR REPLACE INTO labels(code, label)
    SELECT result, label FROM items_v1 WHERE result IS NOT NULL ORDER BY seq;
DROP TABLE items_v1;
"""

_DONE_BY_SEQ = ("UPDATE outcomes SET result = ?, state = 'done', error = NULL, attempts = ?, "
                "batch = ? WHERE seq = ? AND result IS NULL")
_DONE_BY_ID = ("UPDATE outcomes SET result = ?, state = 'done', error = NULL, attempts = ?, "
               "batch = ? WHERE seq = (SELECT seq FROM items WHERE item_id = ?) "
               "AND result IS NULL")
_DEAD_BY_SEQ = ("UPDATE outcomes SET state = 'dead', error = ?, attempts = ?, batch = ? "
                "WHERE seq = ? AND result IS NULL")
_DEAD_BY_ID = ("UPDATE outcomes SET state = 'dead', error = ?, attempts = ?, batch = ? "
               "WHERE seq = (SELECT seq FROM items WHERE item_id = ?) AND result IS NULL")
# the rows of seqs ?2..?3 done, each with the code at its place in ?1 (one character each)
_DONE_RANGE = ("UPDATE outcomes SET result = substr(?1, seq - ?2 + 1, 1), state = 'done', "
               "error = NULL, attempts = ?4, batch = ?5 WHERE seq BETWEEN ?2 AND ?3 "
               "AND result IS NULL")
_NEW_BATCH = "INSERT INTO batches(cost_usd_each, model, provider) VALUES (?, ?, ?)"


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """The task a job store's results answer: its name, ``task_digest`` (system prompt,
    instructions, labels) and model."""

    name: str
    digest: str
    model: str

    def differences(self, other: TaskRecord) -> list[str]:
        """What ``other`` changes, in words (empty when nothing)."""
        found = []
        if other.name != self.name:
            found.append(f"name {self.name!r} -> {other.name!r}")
        if other.digest != self.digest:
            found.append("system prompt, instructions or labels")
        if other.model != self.model:
            found.append(f"model {self.model!r} -> {other.model!r}")
        return found


@dataclass(frozen=True, slots=True)
class Page:
    """Pending items in seq order, as parallel columns: a feed hands ids and texts to the
    engine a page at a time (``Engine.add_page``) without an ``Item`` per row. Iterating
    gives ``(seq, Item)`` pairs for a consumer that wants items."""

    seqs: list[int]
    ids: list[str]
    texts: list[str]
    tags: list[str | None]

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self) -> Iterator[tuple[int, Item]]:
        return zip(self.seqs, map(Item, self.ids, self.texts, self.tags), strict=True)

    @property
    def last_seq(self) -> int:
        """The cursor after this page (its largest seq); raises IndexError when empty."""
        return self.seqs[-1]

    @property
    def tagged(self) -> bool:
        """True when any item of the page has a tag (routing rules may read it)."""
        return self.tags.count(None) != len(self.tags)


class StoreVersionError(sqlite3.DatabaseError):
    """The file is not a job store this version can read (a newer schema, or not ours);
    a ``sqlite3.Error``, so ``ratelab job`` reports it as a store it cannot open."""


class StoreBusyError(InputError):
    """Another process holds the store for a run (``SqliteJobStore.claim``): two runners on
    one store would send, and pay for, the same pending items."""


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

    def page(self, after_seq: int, limit: int) -> Page:
        """Up to ``limit`` pending items with ``seq > after_seq``, in seq order."""
        ...

    def save_results(self, results: Sequence[ItemResult | Accepted],
                     seqs: Mapping[str, int] | None = None,
                     labels: Mapping[str, str] | None = None) -> int:
        """Commit one batch of results; return how many rows changed. ``seqs`` may map
        item ids to the ``seq`` their ``page`` gave them (a faster update); only seqs that
        a ``page`` of this store gave: the update trusts them (``SqliteJobStore`` would
        write an unknown seq as a new outcome row). An ``Accepted``
        entry (``Engine.drain_compact``) stands for the ``done`` items of one reply, their
        codes named by ``labels``."""
        ...

    def bind_task(self, task: TaskRecord, rebind: bool = False) -> TaskRecord | None:
        """Record the task of the job on its first run. Returns the task recorded before
        when it differs from ``task`` (left as it was unless ``rebind``), else None."""
        ...

    def counts(self) -> StoreCounts:
        """Counts by state."""
        ...

    def import_complete(self) -> bool:
        """False while an import of items has not finished (the job is not all here)."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


# an item state's id and failed attempts, read for a whole reply by C-level maps
_ID, _ATTEMPTS = attrgetter("id"), attrgetter("attempts")

# Items inserted per transaction of an import (a chunk is checked and written whole).
_IMPORT_CHUNK = 5000

# At most this many rows per statement (3 bound values each, well under SQLite's 32,766).
_ROWS_PER_STATEMENT = 250


@lru_cache(maxsize=64)
def _done_rows_sql(n: int) -> str:
    """One statement that marks ``n`` rows done, given by their ``seq`` (bound as ``n``
    seqs, then ``n`` codes, then ``n`` failed-attempt counts, then the batch): an upsert
    whose every row conflicts with the outcome row its page read (``outcomes`` rows are
    never deleted), so it updates that row, and only while its result is NULL, as
    ``_DONE_BY_SEQ`` does row by row. One statement rather than ``n`` executions of one:
    about half the instructions per row (no reset, re-bind and step per row)."""
    rows = ",".join(f"(?{i},?{n + i},'done',?{2 * n + i}+1,?{3 * n + 1})"
                    for i in range(1, n + 1))
    return ("INSERT INTO outcomes(seq, result, state, attempts, batch) VALUES " + rows +
            " ON CONFLICT(seq) DO UPDATE SET result = excluded.result, state = 'done', "
            "error = NULL, attempts = excluded.attempts, batch = excluded.batch "
            "WHERE outcomes.result IS NULL")


def _save_accepted(cur: sqlite3.Cursor, accepted: Accepted, seqs: Mapping[str, int],
                   by_id: list[tuple[object, ...]]) -> int:
    """Write the ``done`` rows of one reply's items with one batch row; returns the rows
    changed. Items whose seq ``seqs`` does not know go to ``by_id`` (updated later by
    item_id, as (code, attempts, batch, item id))."""
    call = accepted.call
    batch = int(cur.execute(_NEW_BATCH, (accepted.share, call.model, call.provider)
                            ).lastrowid or 0)
    states = accepted.states
    if len(states) == 1:
        # a one-item reply (the single strategy): one row, without the column lists
        state = states[0]
        seq = seqs.get(state.id)
        if seq is not None:
            return int(cur.execute(_DONE_BY_SEQ, (accepted.codes[state.id],
                                                  state.attempts + 1, batch, seq)).rowcount)
    ids = list(map(_ID, states))
    codes = list(map(accepted.codes.__getitem__, ids))
    attempts = list(map(_ATTEMPTS, states))
    maybe = list(map(seqs.get, ids))
    if None in maybe:
        # not from a page of this store (a caller without seqs): the slow path, by id
        known = [i for i, seq in enumerate(maybe) if seq is not None]
        by_id.extend((codes[i], attempts[i] + 1, batch, ids[i])
                     for i, seq in enumerate(maybe) if seq is None)
        found = [seq for seq in maybe if seq is not None]
        codes = [codes[i] for i in known]
        attempts = [attempts[i] for i in known]
    else:
        found = cast("list[int]", maybe)
    n = len(found)
    if n > 1 and found[-1] - found[0] == n - 1 and attempts.count(attempts[0]) == n:
        # The common reply: consecutive seqs in order (items fed from a page and answered
        # whole), one-character codes, the same attempts: the codes travel as one string
        # and the rows are a seq range, with no bound values per row (about 0.7x the
        # upsert's instructions per row).
        written = "".join(codes)
        if len(written) == n and "" not in codes and found == list(
                range(found[0], found[0] + n)):
            return int(cur.execute(_DONE_RANGE, (written, found[0], found[-1],
                                                 attempts[0] + 1, batch)).rowcount)
    changed = 0
    step = _ROWS_PER_STATEMENT
    for at in range(0, len(found), step):
        part = found[at:at + step] if len(found) > step else found
        n = len(part)
        changed += cur.execute(_done_rows_sql(n), [
            *part, *codes[at:at + n], *attempts[at:at + n], batch]).rowcount
    return changed


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """The statements of ``script`` one by one, inside the caller's transaction
    (``executescript`` would commit it first). No statement here holds a ";" in a string."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


class SqliteJobStore:
    """SQLite job store in WAL mode (one connection; ``retries`` on transient errors).

    Opening a store of the previous schema (1) migrates it; a newer schema, or a file
    whose tables are not a job store's, is refused with ``StoreVersionError``."""

    def __init__(self, path: str, retries: int = 6, base_delay_s: float = 0.05,
                 busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.retries = retries
        self.base_delay_s = base_delay_s
        # how long SQLite itself waits on another connection's lock before the error that
        # ``_retry`` then retries with backoff
        self.busy_timeout_s = busy_timeout_s
        self._rng = random.Random(0)
        # code -> label as written to ``labels``; the labels mapping last seen
        self._labels: dict[str, str] = {}
        self._labels_seen: Mapping[str, str] | None = None
        self._claim: int | None = None  # the descriptor holding this run's flock
        self._conn = self._retry(self._connect)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._open_schema(conn)
            self._labels = dict(conn.execute("SELECT code, label FROM labels").fetchall())
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == SCHEMA_VERSION:
                if "job_task" not in tables:  # a store from before the task was recorded
                    conn.execute(_JOB_TASK)
                if "job_import" not in tables:  # from before imports were marked
                    conn.execute(_JOB_IMPORT)
            elif version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"{self.path}: job store schema {version} was written by a newer ratelab "
                    f"(this one reads schema {SCHEMA_VERSION} and migrates 1)")
            elif version == 0 and "items" in tables and "outcomes" not in tables:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(items)")}
                if not {"seq", "item_id", "canon", "text", "tag", "result", "label", "state",
                        "error", "attempts", "cost_usd", "model", "provider"} <= columns:
                    raise StoreVersionError(f"{self.path}: its items table is not a ratelab "
                                            "job store's (schema 1 or 2)")
                _run_script(conn, _MIGRATE_1.format(schema=_SCHEMA))
            elif version == 0 and not tables & {"items", "outcomes", "batches", "labels"}:
                _run_script(conn, _SCHEMA)
            else:
                raise StoreVersionError(f"{self.path}: not a ratelab job store (schema "
                                        f"{version}, tables {', '.join(sorted(tables))})")
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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
        """Insert items in chunks; an id already present with another text is InputError.

        The store says the import is unfinished (``import_complete``) from before its first
        chunk until the transaction of its last: an interrupt, or an error from ``items``
        midway, leaves the chunks before it stored and the store saying so."""
        def start() -> int:
            conn = self._conn
            # seqs above this are the import's own: a clash with one is a repeat within it
            first = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()[0])
            conn.execute("INSERT OR REPLACE INTO job_import(id, complete) VALUES (1, 0)")
            return first

        before = self._retry(start)
        added = 0
        chunk: list[Item] = []

        def flush(last: bool) -> int:
            def run() -> int:
                conn = self._conn
                new = 0
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # the chunk's items get seqs after the largest (rowids): their outcome
                    # rows are added in one statement at the end
                    top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()[0]
                    for item in chunk:
                        canon = canonical_id(item.id)
                        row = conn.execute("SELECT item_id, text, seq FROM items WHERE "
                                           "canon = ?", (canon,)).fetchone()
                        if row is not None:
                            if row[0] != item.id or row[1] != item.text:
                                whose = (f"item {row[0]!r} earlier in this import"
                                         if row[2] > before else f"stored item {row[0]!r}")
                                raise InputError(f"item {item.id!r}: id collides with {whose}")
                            continue
                        conn.execute("INSERT INTO items(item_id, canon, text, tag) "
                                     "VALUES (?, ?, ?, ?)", (item.id, canon, item.text, item.tag))
                        new += 1
                    conn.execute("INSERT INTO outcomes(seq) SELECT seq FROM items WHERE seq > ?",
                                 (top,))
                    if last:
                        conn.execute("UPDATE job_import SET complete = 1")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                return new

            return self._retry(run)

        for item in items:
            chunk.append(item)
            if len(chunk) >= _IMPORT_CHUNK:
                added += flush(last=False)
                chunk = []
        return added + flush(last=True)

    def import_complete(self) -> bool:
        """False while an import of items has not finished (``import_items``): a resume
        would run only the part imported."""
        row = self._retry(lambda: self._conn.execute(
            "SELECT complete FROM job_import").fetchone())
        return row is None or bool(row[0])

    def stored_items(self, canons: Sequence[str]) -> dict[str, tuple[str, str]]:
        """The stored items of these canonical ids (``canonical_id``), as canonical id ->
        (id, text): what a new import is checked against before it is made."""
        def run(part: Sequence[str]) -> list[tuple[str, str, str]]:
            return self._conn.execute("SELECT canon, item_id, text FROM items WHERE canon IN "
                                      f"({','.join('?' * len(part))})", part).fetchall()

        found: dict[str, tuple[str, str]] = {}
        step = _ROWS_PER_STATEMENT
        for at in range(0, len(canons), step):
            part = canons[at:at + step]
            found.update((c, (i, t)) for c, i, t in self._retry(partial(run, part)))
        return found

    def page(self, after_seq: int, limit: int) -> Page:
        """Cursor pagination: ``WHERE result IS NULL AND seq > ? ORDER BY seq LIMIT ?``."""
        rows = self._retry(lambda: self._conn.execute(
            "SELECT o.seq, i.item_id, i.text, i.tag FROM outcomes o JOIN items i "
            "ON i.seq = o.seq WHERE o.result IS NULL AND o.state = 'pending' AND o.seq > ? "
            "ORDER BY o.seq LIMIT ?", (after_seq, limit)).fetchall())
        if not rows:
            return Page([], [], [], [])
        # TEXT columns come back as str: the rows turn into columns by C-level loops
        seqs, ids, texts, tags = map(list, zip(*rows, strict=True))
        return Page(seqs, ids, texts, tags)

    def save_results(self, results: Sequence[ItemResult | Accepted],
                     seqs: Mapping[str, int] | None = None,
                     labels: Mapping[str, str] | None = None) -> int:
        """One transaction per batch; a row is only written while its result is NULL.

        Rows whose id ``seqs`` maps (from ``page``) are updated by their integer ``seq``
        (the rowid: no lookup in the item_id index), the others by item_id. An
        ``Accepted`` entry is written straight from the engine's record of the reply (no
        ``ItemResult`` per item) with one ``batches`` row for its share, model and
        provider and one statement for its items' rows (``_done_rows_sql``); ``labels``
        (code -> label) is then required. ``ItemResult`` entries
        share a ``batches`` row per (cost, model, provider) of this call; one with none of
        them (a cache hit) has no batch.
        """
        if not results:
            return 0
        by_seq = seqs if seqs is not None else {}
        new_labels: dict[str, str] = {}
        if labels is not None and labels is not self._labels_seen:
            known = self._labels
            new_labels.update((code, label) for code, label in labels.items()
                              if known.get(code) != label)
        # The statements run in run(); batch rows are numbered there (lastrowid), so rows
        # wait here with their batch's key in place of its id.
        accepted: list[Accepted] = []
        item_rows: list[tuple[tuple[object, ...], ItemResult, int | None]] = []
        for r in results:
            if type(r) is Accepted:
                if labels is None:
                    raise ValueError("save_results: Accepted entries need labels")
                accepted.append(r)
                continue
            assert isinstance(r, ItemResult)
            if r.state == "done" and r.code is not None and r.label is not None and \
                    self._labels.get(r.code) != r.label:
                new_labels[r.code] = r.label
            item_rows.append(((r.cost_usd, r.model, r.provider), r, by_seq.get(r.item_id)))

        def run() -> int:
            # one cursor for the whole transaction (conn.execute makes one per statement)
            cur = self._conn.cursor()
            execute = cur.execute
            changed = 0
            done_seq: list[tuple[object, ...]] = []
            done_id: list[tuple[object, ...]] = []
            dead_seq: list[tuple[object, ...]] = []
            dead_id: list[tuple[object, ...]] = []
            execute("BEGIN IMMEDIATE")
            try:
                for a in accepted:
                    changed += _save_accepted(cur, a, by_seq, done_id)
                batches: dict[tuple[object, ...], int | None] = {}
                for key, r, seq in item_rows:
                    if key not in batches:
                        batches[key] = None if key == (0.0, None, None) else int(
                            execute(_NEW_BATCH, key).lastrowid or 0)
                    where = r.item_id if seq is None else seq
                    if r.state == "done":
                        (done_id if seq is None else done_seq).append(
                            (r.code, r.attempts, batches[key], where))
                    else:
                        (dead_id if seq is None else dead_seq).append(
                            (r.error, r.attempts, batches[key], where))
                for rows, sql in ((done_seq, _DONE_BY_SEQ), (done_id, _DONE_BY_ID),
                                  (dead_seq, _DEAD_BY_SEQ), (dead_id, _DEAD_BY_ID)):
                    if rows:
                        changed += cur.executemany(sql, rows).rowcount
                if new_labels:
                    cur.executemany("INSERT OR REPLACE INTO labels(code, label) VALUES (?, ?)",
                                     new_labels.items())
                execute("COMMIT")
            except BaseException:
                execute("ROLLBACK")
                raise
            return changed

        changed = self._retry(run)
        self._labels.update(new_labels)
        if labels is not None:
            self._labels_seen = labels
        return changed

    def requeue_dead(self) -> int:
        """Put dead-lettered items back to pending (after fixing their cause)."""
        cur = self._retry(lambda: self._conn.execute(
            "UPDATE outcomes SET state = 'pending' WHERE state = 'dead' AND result IS NULL"))
        return cur.rowcount

    def bind_task(self, task: TaskRecord, rebind: bool = False) -> TaskRecord | None:
        """Record the task of the job on its first run. Returns the task recorded before
        when it differs from ``task`` (left as it was unless ``rebind``), else None."""

        def run() -> TaskRecord | None:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT name, digest, model FROM job_task").fetchone()
                before = None if row is None else TaskRecord(*map(str, row))
                if before is None or (before != task and rebind):
                    conn.execute("INSERT OR REPLACE INTO job_task(id, name, digest, model) "
                                 "VALUES (1, ?, ?, ?)", (task.name, task.digest, task.model))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return before if before is not None and before != task else None

        return self._retry(run)

    def dead_errors(self, limit: int = 3) -> list[tuple[str, int]]:
        """The commonest last errors of dead-lettered items, with how many items each, most
        first (ties by error): what a user needs to fix before ``requeue_dead``."""
        rows = self._retry(lambda: self._conn.execute(
            "SELECT COALESCE(error, ''), COUNT(*) AS n FROM outcomes WHERE state = 'dead' "
            "GROUP BY 1 ORDER BY n DESC, 1 LIMIT ?", (limit,)).fetchall())
        return [(str(error), int(n)) for error, n in rows]

    def counts(self) -> StoreCounts:
        """Counts by state and the total cost recorded on done items."""
        # One scan; a done item's cost is its batch's share (a rowid lookup per item).
        row = self._retry(lambda: self._conn.execute(
            "SELECT COUNT(*), SUM(o.state = 'done'), SUM(o.state = 'dead'), "
            "SUM(o.result IS NULL AND o.state = 'pending'), "
            "COALESCE(SUM(CASE WHEN o.state = 'done' THEN b.cost_usd_each END), 0) "
            "FROM outcomes o LEFT JOIN batches b ON b.id = o.batch").fetchone())
        return StoreCounts(int(row[0]), int(row[1] or 0), int(row[2] or 0), int(row[3] or 0),
                           float(row[4]))

    def results(self) -> dict[str, tuple[str, str | None, str | None]]:
        """Every item's (state, code, error), for reports and tests."""
        rows = self._retry(lambda: self._conn.execute(
            "SELECT i.item_id, o.state, o.result, o.error FROM items i JOIN outcomes o "
            "ON o.seq = i.seq").fetchall())
        return {str(r[0]): (str(r[1]), r[2], r[3]) for r in rows}

    def claim(self) -> None:
        """Hold the store for this process's run until ``close``; raises StoreBusyError at
        once when another process holds it. An advisory ``flock`` on the database file:
        SQLite's own locks are ``fcntl`` record locks, a separate set, so this never blocks
        a read or a write, only a second claim."""
        if self._claim is not None:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusyError(f"{self.path}: another process is running a job on this "
                                 "store; wait for it to finish, or stop it (Ctrl-C saves "
                                 "its progress)") from None
        self._claim = fd

    def close(self) -> None:
        """Close the connection (and release a claim)."""
        self._conn.close()
        if self._claim is not None:
            os.close(self._claim)  # closing the descriptor releases its flock
            self._claim = None
