"""The gateway's state behind three small Protocols: task store (+ lane queues and
leases), per-user limiter, provider window. ``local_state`` keeps them in-process (SQLite
for tasks), ``redis_state`` in Redis so several gateway processes share them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchclient.policy.classify import Classified
from batchclient.policy.wire import Response
from gateway.config import TierLimits
from gateway.limits import UserDecision
from gateway.pacing import PacedCall

STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "dead_lettered")
FINAL_STATES = frozenset({"done", "failed", "dead_lettered"})
# Queues in claim order: interactive first, then packed items, then other background work;
# "shared" is the single FIFO used when lanes are switched off.
QUEUES: tuple[str, ...] = ("interactive", "batch", "background", "shared")


class StateUnavailable(RuntimeError):
    """The shared state (Redis) cannot be reached; the gateway answers 503 meanwhile."""


@dataclass(slots=True)
class TaskRecord:
    """One accepted task. ``body`` is the OpenAI chat body (or ``{"item": ...}`` for a
    packable item); times are virtual seconds; ``result``/``error`` are JSON objects."""

    id: str
    user: str
    tier: str
    lane: str
    queue: str
    body: dict[str, Any]
    tokens: int
    created: float
    state: str = "queued"
    attempts: int = 0
    misses: int = 0
    updated: float = 0.0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    status: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def new_id() -> str:
        """A fresh task id, unique across processes (never all digits)."""
        return "task_" + uuid.uuid4().hex

    @property
    def final(self) -> bool:
        """Whether the task reached done, failed or dead_lettered."""
        return self.state in FINAL_STATES

    def spec_json(self) -> str:
        """The immutable part of the record as JSON (what a queue entry needs to run it)."""
        return json.dumps({"user": self.user, "tier": self.tier, "lane": self.lane,
                           "queue": self.queue, "body": self.body, "tokens": self.tokens,
                           "created": self.created}, separators=(",", ":"))

    @classmethod
    def from_parts(cls, task_id: str, spec: str, state: str, attempts: int, misses: int,
                   updated: float, result: str | None, error: str | None,
                   status: int | None) -> TaskRecord:
        """Rebuild a record from its stored columns or hash fields."""
        s = json.loads(spec)
        return cls(task_id, s["user"], s["tier"], s["lane"], s["queue"], s["body"],
                   int(s["tokens"]), float(s["created"]), state, attempts, misses, updated,
                   json.loads(result) if result else None, json.loads(error) if error else None,
                   status)

    def public(self) -> dict[str, Any]:
        """The JSON view of ``GET /v1/tasks/{id}``."""
        out: dict[str, Any] = {"id": self.id, "object": "task", "state": self.state,
                               "lane": self.lane, "user": self.user,
                               "attempts": self.attempts}
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        if self.status is not None:
            out["upstream_status"] = self.status
        return out


class TaskStore(Protocol):
    """Durable tasks, their lane queues and the leases of running ones."""

    async def put(self, task: TaskRecord) -> None:
        """Store ``task`` and queue it; returns once it is durable."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task, or None for an unknown id."""
        ...

    async def claim(self, queues: Sequence[str], now: float, lease_s: float,
                    batch_max: int = 1) -> list[TaskRecord]:
        """Lease the next tasks: one from the first non-empty of ``queues``, or up to
        ``batch_max`` when that queue is ``batch``; marks them running, attempts + 1."""
        ...

    async def finish(self, task: TaskRecord, now: float) -> bool:
        """Store the final state and result, then drop the lease (result before ack).
        False when the task was already final (never stored twice)."""
        ...

    async def requeue(self, task: TaskRecord, now: float, back: bool = False) -> None:
        """Put a leased task back at the front of its queue (``misses`` and ``attempts`` as
        given), or at its ``back`` (a task no upstream can take now: the others first)."""
        ...

    async def depths(self) -> Mapping[str, int]:
        """Tasks waiting per queue."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


class UserLimiter(Protocol):
    """Per-user token buckets by tier (``gateway.limits.admit_user`` semantics)."""

    async def admit(self, user: str, tier: TierLimits, now: float,
                    tokens: int) -> UserDecision:
        """Take one request and ``tokens`` from the user's buckets, or refuse."""
        ...


class ItemCache(Protocol):
    """Codes of packed items already answered, by ``batchclient.policy.job.cache_key``
    (normalised text, task, model): a duplicate item is answered from here, not paid for
    again. Shared by every process of the state."""

    async def cached_codes(self, keys: Sequence[str]) -> dict[str, str]:
        """Codes of the keys present."""
        ...

    async def remember_codes(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """Store (key, code, model) rows; the first code stored for a key stays."""
        ...


class ProviderWindow(Protocol):
    """One upstream key's pacing (``gateway.pacing.UpstreamPacer``: the batching client's
    throttle per model); with Redis its 429 hold is shared by every gateway process."""

    async def acquire(self, now: float, call: PacedCall) -> float:
        """0.0 when the call may go (reserved), else virtual seconds to wait."""
        ...

    async def room(self, now: float, call: PacedCall) -> float:
        """Virtual seconds until the window has room for the call at all (a 429's hold
        included, the graduated spacing not); reserves nothing."""
        ...

    async def settle(self, now: float, call: PacedCall, response: Response,
                     verdict: Classified) -> None:
        """Settle the call's reservation to its answer and observe its rate-limit headers."""
        ...

    async def hold(self, until: float) -> None:
        """Admit no call before virtual time ``until`` (the provider answered 429)."""
        ...
