"""Events across gateway processes over Redis pub/sub: task events and breaker changes.

With Redis, the process that runs a task is often not the one its subscriber is connected
to. Every process publishes the events of the tasks it runs (state changes and streamed
tokens) on one channel and delivers those of the other processes to its local subscribers,
so an SSE subscriber sees a task run elsewhere as it happens, tokens included (the store
holds states and results, never tokens). Breakers that open or close in one process are
announced the same way and applied by the others (``Router.apply_remote``).

Pub/sub delivers at most once: an event published while a process is disconnected is lost
to it. The SSE handler's store polls stay the safety net for states; tokens missed that
way are missed, as with any live stream.

Tokens are the bulk of the traffic (one message per streamed token), so a process that
knows no other gateway listens keeps them to itself: PUBLISH returns how many subscribers
got a message, and a process that starts announces itself (``hello``), so the others
publish tokens again before it can take its first request. States and breaker changes are
always published; they keep the count fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.clock import GatewayClock
from gateway.events import Event, EventHub
from gateway.routing import Router

log = logging.getLogger(__name__)

RECONNECT_S = 0.5     # wall seconds between attempts to resubscribe after a failure
MAX_PENDING = 10_000  # events queued for publishing while Redis is slow or down


class RedisEventRelay:
    """Publishes the local hub's events and delivers the other processes' to it.

    ``start()`` subscribes before it returns, so no event published after it is missed;
    ``close()`` sends what is queued (briefly) and unsubscribes.
    """

    def __init__(self, client: aioredis.Redis, hub: EventHub, prefix: str,
                 router: Router | None = None, clock: GatewayClock | None = None) -> None:
        self.client = client
        self.hub = hub
        self.router = router
        self.clock = clock
        self.channel = f"{prefix}events"
        self.origin = uuid.uuid4().hex  # this process: its own events come back, skipped
        # None: close() wakes the sender
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue(MAX_PENDING)
        self._tasks: list[asyncio.Task[None]] = []
        # Set by close(): both loops stop at their next turn even when their cancellation
        # was swallowed. On Python 3.11 a cancel that races a timeout inside redis-py comes
        # back as the timeout, a RedisError or OSError that the loops take for an outage
        # (the sender then waited on its empty outbox, and close() for it, forever).
        self._closing = False
        self._subscribed = False  # this process's own subscription counts in PUBLISH's reply
        self._paused = False      # said "paused" and not yet "resumed"
        self._others = True       # another process may listen: until PUBLISH says otherwise
        self.dropped = 0
        self.kept_local = 0       # token events not published: no other process listened

    async def start(self) -> None:
        self._closing = False
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self._subscribed = True
            # before this process takes requests: the others relay tokens from now on
            await self._publish(json.dumps({"o": self.origin, "hello": 1}))
        except (RedisError, OSError) as exc:  # Redis down: the receive loop keeps trying
            self._pause(exc)
        self.hub.relay = self.publish
        if self.router is not None:
            self.router.on_change = self.publish_breaker
        self._tasks = [asyncio.create_task(self._send(), name="ratelab-relay-send"),
                       asyncio.create_task(self._receive(pubsub), name="ratelab-relay-recv")]

    def publish(self, task_id: str, event: Event) -> None:
        """Queue a local task event for the other processes (never blocks the worker)."""
        if not self._others and "token" in event:
            self.kept_local += 1
            return
        self._queue({"o": self.origin, "t": task_id, "e": event})

    def publish_breaker(self, upstream: str, opened_at: float | None) -> None:
        """Queue a breaker change (opened at a virtual time, or closed: None)."""
        self._queue({"o": self.origin, "b": upstream, "at": opened_at})

    def _queue(self, payload: dict[str, Any]) -> None:
        message = json.dumps(payload, separators=(",", ":"))
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1  # subscribers elsewhere fall back to the store's states

    async def _send(self) -> None:
        while not self._closing:
            message = await self._outbox.get()
            if message is None:
                continue  # close()'s wake-up
            try:
                await self._publish(message)
            except (RedisError, OSError) as exc:
                self.dropped += 1
                log.warning("task event not relayed (Redis: %s)", exc)
                await asyncio.sleep(RECONNECT_S)

    async def _publish(self, message: str) -> None:
        receivers = int(await self.client.publish(self.channel, message))
        self._others = receivers > (1 if self._subscribed else 0)

    async def _receive(self, pubsub: Any) -> None:
        while not self._closing:
            try:
                # listen() ends at once when the subscription was never made
                async for message in pubsub.listen():
                    self._deliver(message.get("data"))
            except (RedisError, OSError) as exc:
                if self._closing:
                    break
                self._pause(exc)
            self._subscribed = False
            await asyncio.sleep(RECONNECT_S)
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            with contextlib.suppress(RedisError, OSError):
                await pubsub.subscribe(self.channel)
                self._subscribed = True
                if self._paused:
                    # said once, as the pause was: an operator watching the log sees both
                    self._paused = False
                    log.warning("task events of other gateways resumed")

    def _pause(self, exc: BaseException) -> None:
        if not self._paused:
            self._paused = True
            log.warning("task events of other gateways paused (Redis: %s)", exc)

    def _deliver(self, data: object) -> None:
        if not isinstance(data, str):
            return
        try:
            message = json.loads(data)
            if not isinstance(message, dict) or message.get("o") == self.origin:
                return
            self._others = True  # another gateway is on the channel
            if "hello" in message:
                return
            if "b" in message:
                self._breaker(message["b"], message["at"])
                return
            task_id, event = message["t"], message["e"]
        except (ValueError, KeyError, TypeError):
            return  # not ours: another program on the channel
        if isinstance(task_id, str) and isinstance(event, dict):
            self.hub.deliver(task_id, event)

    def _breaker(self, upstream: object, opened_at: object) -> None:
        if self.router is None or self.clock is None or not isinstance(upstream, str):
            return
        if opened_at is not None and (isinstance(opened_at, bool)
                                      or not isinstance(opened_at, int | float)
                                      or not math.isfinite(opened_at)):
            return  # not a time: ignored rather than opening a breaker forever
        self.router.apply_remote(self.clock.now(), upstream,
                                 None if opened_at is None else float(opened_at))

    async def close(self) -> None:
        """Flush the outbox for up to a second, then stop both loops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while not self._outbox.empty():
                    await asyncio.sleep(0.01)
        self.hub.relay = None
        if self.router is not None:
            self.router.on_change = None
        self._closing = True
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.QueueFull):  # full: the sender is not waiting
            self._outbox.put_nowait(None)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
