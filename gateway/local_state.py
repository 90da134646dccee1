"""In-process state: SQLite task store (WAL, group commit), dict-backed buckets, pacing.

One gateway process owns the SQLite file, so at open every task left ``running`` by a
previous process is re-queued (its lease died with that process) and ``done`` tasks stay
done: a restart loses no accepted task and pays for no finished one twice.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import deque
from collections.abc import Mapping, Sequence

from batchclient.cache import SqliteResultCache
from batchclient.policy.classify import Classified
from batchclient.policy.wire import Response
from gateway.config import TierLimits
from gateway.limits import UserBuckets, UserDecision, admit_user, full_buckets
from gateway.pacing import PacedCall, UpstreamPacer
from gateway.state import QUEUES, TaskRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    status INTEGER
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks(state) WHERE state IN ('queued', 'running');
"""
_COLUMNS = "id, spec, state, attempts, misses, updated, result, error, status"


def _json(value: object) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


class SqliteTaskStore:
    """Tasks in a SQLite file (WAL); the queues are in-memory deques rebuilt at open.

    ``put`` returns only after the transaction holding the task has committed; puts that
    arrive in the same loop tick share one commit (group commit). It is also the item cache
    (``ItemCache``): the batching client's result cache, in the same file, so a restart
    keeps it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._queues: dict[str, deque[TaskRecord]] = {q: deque() for q in QUEUES}
        self._pending: list[tuple[TaskRecord, asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self.recovered = self._recover()
        self._cache = SqliteResultCache(path)

    def _recover(self) -> int:
        """Re-queue what a previous process left queued or running, in arrival order."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE state IN ('queued', 'running') ORDER BY seq"
        ).fetchall()
        self._db.execute("UPDATE tasks SET state = 'queued' WHERE state = 'running'")
        for row in rows:
            task = TaskRecord.from_parts(*row)
            task.state = "queued"
            self._queues[task.queue].append(task)
        return sum(1 for row in rows if row[2] == "running")

    async def put(self, task: TaskRecord) -> None:
        """Store and queue ``task`` once its commit is done."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((task, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        try:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO tasks (id, queue, spec, state, updated) VALUES (?, ?, ?, ?, ?)",
                [(t.id, t.queue, t.spec_json(), t.state, t.created) for t, _ in pending])
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            return
        for task, future in pending:
            self._queues[task.queue].append(task)
            if not future.done():
                future.set_result(None)

    async def get(self, task_id: str) -> TaskRecord | None:
        """The stored task, or None."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?",
                               (task_id,)).fetchone()
        return None if row is None else TaskRecord.from_parts(*row)

    async def claim(self, queues: Sequence[str], now: float, lease_s: float,
                    batch_max: int = 1) -> list[TaskRecord]:
        """Take the head of the first non-empty queue (up to ``batch_max`` from ``batch``)."""
        for name in queues:
            q = self._queues[name]
            if not q:
                continue
            n = batch_max if name == "batch" else 1
            out = [q.popleft() for _ in range(min(n, len(q)))]
            for task in out:
                task.state = "running"
                task.attempts += 1
                task.updated = now
            # Autocommit, no fsync (synchronous=NORMAL): a crash while running re-queues it.
            self._db.executemany(
                "UPDATE tasks SET state = 'running', attempts = ?, updated = ? WHERE id = ?",
                [(t.attempts, now, t.id) for t in out])
            return out
        return []

    async def finish(self, task: TaskRecord, now: float) -> bool:
        """Commit the final state and result; False if it was already final."""
        cur = self._db.execute(
            "UPDATE tasks SET state = ?, result = ?, error = ?, status = ?, misses = ?, "
            "updated = ? WHERE id = ? AND state NOT IN ('done', 'failed', 'dead_lettered')",
            (task.state, _json(task.result), _json(task.error), task.status, task.misses, now,
             task.id))
        return cur.rowcount == 1

    async def requeue(self, task: TaskRecord, now: float, back: bool = False) -> None:
        """Back to the front of its queue."""
        task.state = "queued"
        self._db.execute("UPDATE tasks SET state = 'queued', misses = ?, attempts = ?, "
                         "updated = ? WHERE id = ?", (task.misses, task.attempts, now, task.id))
        if back:
            self._queues[task.queue].append(task)
        else:
            self._queues[task.queue].appendleft(task)

    async def depths(self) -> Mapping[str, int]:
        """Waiting tasks per queue."""
        return {name: len(q) for name, q in self._queues.items()}

    async def cached_codes(self, keys: Sequence[str]) -> dict[str, str]:
        """Codes of the keys present in the item cache."""
        return self._cache.get_many(keys)

    async def remember_codes(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """Store (key, code, model) rows in the item cache; the first code stays."""
        self._cache.put_codes(rows)

    async def close(self) -> None:
        """Flush what is pending and close the file."""
        if self._pending:
            self._flush()
        self._cache.close()
        self._db.close()


class MemoryUserLimiter:
    """Per-user buckets in a dict (one gateway process)."""

    def __init__(self) -> None:
        self._buckets: dict[str, UserBuckets] = {}

    async def admit(self, user: str, tier: TierLimits, now: float,
                    tokens: int) -> UserDecision:
        """``admit_user`` on this user's buckets (created full on first sight)."""
        state = self._buckets.get(user)
        if state is None:
            state = self._buckets[user] = full_buckets(tier, now)
        return admit_user(state, tier, now, tokens)


class MemoryProviderWindow:
    """The pacing of one upstream in one gateway process (an ``UpstreamPacer``)."""

    def __init__(self, pacer: UpstreamPacer) -> None:
        self.pacer = pacer

    async def acquire(self, now: float, call: PacedCall) -> float:
        """``UpstreamPacer.acquire``."""
        return self.pacer.acquire(now, call)

    async def room(self, now: float, call: PacedCall) -> float:
        """``UpstreamPacer.room_wait``."""
        return self.pacer.room_wait(now, call)

    async def settle(self, now: float, call: PacedCall, response: Response,
                     verdict: Classified) -> None:
        """``UpstreamPacer.settle``."""
        self.pacer.settle(now, call, response, verdict)

    async def hold(self, until: float) -> None:
        """``UpstreamPacer.block``."""
        self.pacer.block(until)
