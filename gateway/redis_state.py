"""Shared state in Redis: tasks in hashes, one list per queue, leases in a sorted set,
per-user buckets and each upstream's 429 hold, each step one Lua script (``redis_scripts``).

Several gateway processes pointed at one Redis share the users' limits and the provider's
key. The key is paced in each process by the batching client's throttle
(``gateway.pacing``), not by a window in Redis: reserve at dispatch, settle to the reply's
usage, learn limits and other traffic from the provider's rate-limit headers, graduated
steps. Each process keeps its own usage within its even part of the key's limits: the
upstream's ``share`` over the N processes that beat in Redis (``Presence``: N counted
live, so a process that starts or dies moves every other's part within seconds; together
they never plan past the limit), while the headers,
which count every process's calls, are held against the whole limit; a 429 shuts the
upstream for every process until its retry-after (``window:<name>:hold``). A shared
window in Lua would have to mirror the throttle's settling, header correction and steps
to the token, and would cost a round trip per decision, for what the split already
bounds; the price of the split is that one busy process cannot use an idle one's part.

A task whose worker died is re-queued when its lease expires; ``finish`` stores
the result and drops the lease in one step and never overwrites a final state. Any
connection failure surfaces as ``StateUnavailable`` (the HTTP layer answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from batchclient.policy.classify import Classified
from batchclient.policy.job import hash_text
from batchclient.policy.wire import Response
from gateway import redis_scripts as lua
from gateway.config import TierLimits
from gateway.limits import DAY_S, UserDecision
from gateway.pacing import PacedCall, UpstreamPacer
from gateway.state import QUEUES, StateUnavailable, TaskRecord

T = TypeVar("T")

# Wall seconds between a process's heartbeats, and after the last one before it no longer
# counts as pacing the key (a process that died without leaving).
PRESENCE_EVERY_S = 1.0
PRESENCE_TTL_S = 5.0


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
                 time_scale: float = 1.0) -> None:
        self.r = client
        self.prefix = prefix
        self.time_scale = time_scale
        self._admit = client.register_script(lua.USER_ADMIT)
        self._hold = client.register_script(lua.PROVIDER_HOLD)
        self._enqueue = client.register_script(lua.ENQUEUE)
        self._claim = client.register_script(lua.CLAIM)
        self._finish = client.register_script(lua.FINISH)
        self._requeue = client.register_script(lua.REQUEUE)

    # ------------------------------------------------------------ ItemCache

    async def cached_codes(self, keys: Sequence[str]) -> dict[str, str]:
        """Codes of the keys present (one HMGET on the ``cache`` hash, whose fields are the
        keys' digests: a key holds the item's whole text)."""
        if not keys:
            return {}
        fields = [hash_text(k) for k in keys]
        codes: list[str | None] = await _guard(lambda: self.r.hmget(
            f"{self.prefix}cache", fields))  # type: ignore[arg-type,return-value]
        return {k: c for k, c in zip(keys, codes, strict=True) if c}

    async def remember_codes(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """HSETNX each (key, code) in one pipeline: the first code stored stays."""
        if not rows:
            return

        async def run() -> None:
            async with self.r.pipeline(transaction=False) as pipe:
                for key, code, _model in rows:
                    pipe.hsetnx(f"{self.prefix}cache", hash_text(key), code)
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

    async def requeue(self, task: TaskRecord, now: float, back: bool = False) -> None:
        """Back to the front of its queue (only if still running under our lease)."""
        task.state = "queued"
        await _guard(lambda: self._requeue(
            keys=[self._task_key(task.id), f"{self.prefix}leases", self._queue_key(task.queue)],
            args=[task.id, task.misses, repr(now), task.attempts, int(back)]))

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

    def window(self, pacer: UpstreamPacer) -> RedisWindow:
        """The pacing of one upstream (``pacer``, this process's) with its 429 hold shared
        under ``window:<name>:hold``."""
        return RedisWindow(self, f"window:{pacer.upstream.name}", pacer)

    async def beat(self, process: str, wall: float) -> int:
        """Mark gateway process ``process`` live at wall-clock ``wall``; how many are (those
        that beat within ``PRESENCE_TTL_S``), this one included."""
        key = f"{self.prefix}processes"

        async def run() -> int:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.zadd(key, {process: wall})
                pipe.zremrangebyscore(key, "-inf", wall - PRESENCE_TTL_S)
                pipe.zcard(key)
                result = await pipe.execute()
            return int(result[-1])

        return await _guard(run)

    async def leave(self, process: str) -> None:
        """``process`` stops: it no longer counts (the others take its part at once)."""
        await _guard(lambda: self.r.zrem(f"{self.prefix}processes", process))

    async def held_until(self, name: str) -> float:
        """Virtual time before which the window ``<prefix><name>`` admits nothing (0.0)."""
        value = await _guard(lambda: self.r.get(f"{self.prefix}{name}:hold"))
        return float(value) if value else 0.0

    async def window_hold(self, name: str, until: float) -> None:
        """Shut the window ``<prefix><name>`` until virtual time ``until``, for every
        gateway process sharing it (a later hold extends it, an earlier one is moot)."""
        await _guard(lambda: self._hold(keys=[f"{self.prefix}{name}:hold"], args=[repr(until)]))


class RedisWindow:
    """A ``ProviderWindow``: this process's pacer of one upstream, whose ``share`` of the
    key's limits bounds this process's own usage (the headers count every process's), and
    a 429 hold shared through Redis, so one process's 429 holds them all."""

    __slots__ = ("key", "pacer", "state")

    def __init__(self, state: RedisState, key: str, pacer: UpstreamPacer) -> None:
        self.state = state
        self.key = key
        self.pacer = pacer

    async def acquire(self, now: float, call: PacedCall) -> float:
        """The shared hold's wait, else ``UpstreamPacer.acquire``."""
        held = await self.state.held_until(self.key)
        if now < held:
            return held - now
        return self.pacer.acquire(now, call)

    async def room(self, now: float, call: PacedCall) -> float:
        """The shared hold's wait, else ``UpstreamPacer.room_wait``."""
        held = await self.state.held_until(self.key)
        if now < held:
            return held - now
        return self.pacer.room_wait(now, call)

    async def settle(self, now: float, call: PacedCall, response: Response,
                     verdict: Classified) -> None:
        """``UpstreamPacer.settle`` (this process's usage only: nothing shared)."""
        self.pacer.settle(now, call, response, verdict)

    async def hold(self, until: float) -> None:
        """Block this process's pacer and shut the shared window until ``until``."""
        self.pacer.block(until)
        await self.state.window_hold(self.key, until)


class Presence:
    """This process's heartbeat in Redis, and the count of live gateway processes it reads
    back, handed to every upstream's pacer (``UpstreamPacer.set_processes``): each process
    paces its even part of the keys, and the parts follow processes that start or stop."""

    def __init__(self, state: RedisState, pacers: Sequence[UpstreamPacer]) -> None:
        self.state = state
        self.pacers = list(pacers)
        self.id = uuid.uuid4().hex
        self.count = 1
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        """One heartbeat; the pacers take the count (kept as it was while Redis is away)."""
        with contextlib.suppress(StateUnavailable):
            self.count = await self.state.beat(self.id, time.time())
        for pacer in self.pacers:
            pacer.set_processes(self.count)

    async def start(self) -> None:
        """Beat once (the parts are right before the first call), then every
        ``PRESENCE_EVERY_S``."""
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="gateway-presence")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_EVERY_S)
            await self.beat()

    async def close(self) -> None:
        """Stop beating and leave, so the other processes take this one's part."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(StateUnavailable):
            await self.state.leave(self.id)
