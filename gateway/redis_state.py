"""Shared state in Redis: tasks in hashes, one list per queue, leases in a sorted set,
per-user buckets and the provider window, each step one Lua script (``redis_scripts``).

Several gateway processes pointed at one Redis share the provider quota and the users'
limits. A task whose worker died is re-queued when its lease expires; ``finish`` stores
the result and drops the lease in one step and never overwrites a final state. Any
connection failure surfaces as ``StateUnavailable`` (the HTTP layer answers 503).
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import redis_scripts as lua
from gateway.config import TierLimits
from gateway.limits import DAY_S, WINDOW_S, UserDecision
from gateway.state import QUEUES, StateUnavailable, TaskRecord

T = TypeVar("T")


def connect(url: str, timeout_s: float = 2.0) -> aioredis.Redis:
    """A client that fails fast (no hidden retries) so an outage shows at once as 503."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), decode_responses=True)


async def _guard(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StateUnavailable(f"Redis unreachable: {exc}") from exc


def _dump(value: object) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"))


class RedisState:
    """TaskStore, UserLimiter and ProviderWindow over one Redis connection pool.

    ``prefix`` namespaces every key (tests and separate deployments on one Redis);
    ``time_scale`` converts virtual durations to Redis expiry times.
    """

    def __init__(self, client: aioredis.Redis, *, prefix: str = "ratelab:gw:",
                 rpm: int | None = None, tpm: int | None = None,
                 time_scale: float = 1.0, window_margin_s: float = 1.0) -> None:
        self.r = client
        self.window_s = WINDOW_S + window_margin_s
        self.prefix = prefix
        self.rpm = rpm
        self.tpm = tpm
        self.time_scale = time_scale
        self._admit = client.register_script(lua.USER_ADMIT)
        self._acquire = client.register_script(lua.PROVIDER_ACQUIRE)
        self._hold = client.register_script(lua.PROVIDER_HOLD)
        self._enqueue = client.register_script(lua.ENQUEUE)
        self._claim = client.register_script(lua.CLAIM)
        self._finish = client.register_script(lua.FINISH)
        self._requeue = client.register_script(lua.REQUEUE)

    # ------------------------------------------------------------ ItemCache

    async def cached_codes(self, keys: Sequence[str]) -> dict[str, str]:
        """Codes of the keys present (one HMGET on the ``cache`` hash)."""
        if not keys:
            return {}
        codes: list[str | None] = await _guard(lambda: self.r.hmget(
            f"{self.prefix}cache", list(keys)))  # type: ignore[arg-type,return-value]
        return {k: c for k, c in zip(keys, codes, strict=True) if c}

    async def remember_codes(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """HSETNX each (key, code) in one pipeline: the first code stored stays."""
        if not rows:
            return

        async def run() -> None:
            async with self.r.pipeline(transaction=False) as pipe:
                for key, code, _model in rows:
                    pipe.hsetnx(f"{self.prefix}cache", key, code)
                await pipe.execute()

        await _guard(run)

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def _queue_key(self, queue: str) -> str:
        return f"{self.prefix}q:{queue}"

    async def ping(self) -> bool:
        """True when Redis answers."""
        return bool(await _guard(self.r.ping))

    # ------------------------------------------------------------ TaskStore

    async def put(self, task: TaskRecord) -> None:
        """Store the task hash and queue its id, atomically."""
        await _guard(lambda: self._enqueue(
            keys=[self._task_key(task.id), self._queue_key(task.queue)],
            args=[task.id, task.spec_json(), repr(task.created)]))

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task, or None."""
        h: dict[str, str] = await _guard(
            lambda: self.r.hgetall(self._task_key(task_id)))  # type: ignore[arg-type,return-value]
        if not h or "spec" not in h:
            return None
        status = h.get("status") or None
        return TaskRecord.from_parts(
            task_id, h["spec"], h.get("state", "queued"), int(h.get("attempts", 0)),
            int(h.get("misses", 0)), float(h.get("updated", 0.0)), h.get("result") or None,
            h.get("error") or None, int(status) if status else None)

    async def claim(self, queues: Sequence[str], now: float, lease_s: float,
                    batch_max: int = 1) -> list[TaskRecord]:
        """Re-queue expired leases, then lease the next task(s) (see ``TaskStore``)."""
        raw: list[str] = await _guard(lambda: self._claim(
            keys=[f"{self.prefix}leases"],
            args=[self.prefix, repr(now), repr(now + lease_s), batch_max, *queues]))
        out = []
        for i in range(0, len(raw), 3):
            attempts, misses = raw[i + 2].split(":")
            out.append(TaskRecord.from_parts(raw[i], raw[i + 1], "running", int(attempts),
                                             int(misses), now, None, None, None))
        return out

    async def finish(self, task: TaskRecord, now: float) -> bool:
        """Store the final state and result, drop the lease; False if already final."""
        done = await _guard(lambda: self._finish(
            keys=[self._task_key(task.id), f"{self.prefix}leases"],
            args=[task.id, task.state, _dump(task.result), _dump(task.error),
                  "" if task.status is None else str(task.status), task.misses, repr(now)]))
        return bool(done)

    async def requeue(self, task: TaskRecord, now: float) -> None:
        """Back to the front of its queue (only if still running under our lease)."""
        task.state = "queued"
        await _guard(lambda: self._requeue(
            keys=[self._task_key(task.id), f"{self.prefix}leases", self._queue_key(task.queue)],
            args=[task.id, task.misses, repr(now)]))

    async def depths(self) -> Mapping[str, int]:
        """Waiting tasks per queue."""
        async def run() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for q in QUEUES:
                pipe.llen(self._queue_key(q))
            return await pipe.execute()
        lengths = await _guard(run)
        return {q: int(n) for q, n in zip(QUEUES, lengths, strict=True)}

    async def close(self) -> None:
        """Close the connection pool."""
        with contextlib.suppress(RedisError):
            await self.r.aclose()

    # ------------------------------------------------------------ UserLimiter

    async def admit(self, user: str, tier: TierLimits, now: float,
                    tokens: int) -> UserDecision:
        """One atomic bucket step for ``user`` (``gateway.limits.admit_user`` in Lua)."""
        # Idle buckets refill completely within a day; keep them a little longer.
        ttl_ms = max(1000, math.ceil(2 * DAY_S / self.time_scale * 1000))
        res = await _guard(lambda: self._admit(
            keys=[f"{self.prefix}user:{user}"],
            args=[repr(now), -1 if tier.rpm is None else repr(float(tier.rpm)),
                  repr(float(tier.capacity or 0.0)),
                  -1 if tier.tokens_per_day is None else tier.tokens_per_day, tokens, ttl_ms]))
        allowed, limit, wait = int(res[0]), str(res[1]), float(res[2])
        return UserDecision(bool(allowed), limit, wait)

    # ------------------------------------------------------------ ProviderWindow

    async def acquire(self, now: float, tokens: int, ceiling: float) -> float:
        """One atomic step of the shared sliding window (``SlidingWindow`` in Lua) with the
        limits given at construction (keys ``window``, ``window:tokens``)."""
        return await self.window_step("window", self.rpm, self.tpm, now, tokens, ceiling)

    async def hold(self, until: float) -> None:
        """``window_hold`` of the window given at construction."""
        await self.window_hold("window", until)

    def window(self, upstream: str, rpm: int | None, tpm: int | None) -> RedisWindow:
        """The shared window of one upstream's key (keys ``window:<name>``), for gateways
        in front of several providers."""
        return RedisWindow(self, f"window:{upstream}", rpm, tpm)

    async def window_step(self, name: str, rpm: int | None, tpm: int | None, now: float,
                          tokens: int, ceiling: float) -> float:
        """One atomic step of the sliding window under keys ``<prefix><name>``."""
        res = await _guard(lambda: self._acquire(
            keys=[f"{self.prefix}{name}", f"{self.prefix}{name}:tokens",
                  f"{self.prefix}{name}:hold"],
            args=[repr(now), repr(self.window_s), -1 if rpm is None else rpm,
                  -1 if tpm is None else tpm, tokens, repr(ceiling), uuid.uuid4().hex]))
        return float(res)

    async def window_hold(self, name: str, until: float) -> None:
        """Shut the window under keys ``<prefix><name>`` until virtual time ``until``, for
        every gateway process sharing it (``SlidingWindow.hold``)."""
        await _guard(lambda: self._hold(keys=[f"{self.prefix}{name}:hold"], args=[repr(until)]))


class RedisWindow:
    """A ``ProviderWindow`` over one upstream's keys in a ``RedisState``."""

    __slots__ = ("key", "rpm", "state", "tpm")

    def __init__(self, state: RedisState, key: str, rpm: int | None, tpm: int | None) -> None:
        self.state = state
        self.key = key
        self.rpm = rpm
        self.tpm = tpm

    async def acquire(self, now: float, tokens: int, ceiling: float) -> float:
        """One atomic step of this upstream's shared sliding window."""
        return await self.state.window_step(self.key, self.rpm, self.tpm, now, tokens,
                                            ceiling)

    async def hold(self, until: float) -> None:
        """Shut this upstream's shared window until ``until`` (every process)."""
        await self.state.window_hold(self.key, until)
