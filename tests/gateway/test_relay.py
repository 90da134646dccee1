"""The Redis event relay on a real redis-server: tokens stay local while no other gateway
listens, flow again as soon as one starts, and breaker messages that carry no time are
ignored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.events import EventHub
from gateway.relay import RedisEventRelay
from tests.gateway.conftest import RedisProcess


@pytest.fixture
async def relays(redis_server: RedisProcess) -> AsyncIterator[Callable[..., Any]]:
    """Factory of started relays, each with its own hub and Redis client; closed after."""
    opened: list[tuple[RedisEventRelay, aioredis.Redis]] = []

    async def start() -> tuple[EventHub, RedisEventRelay]:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        hub = EventHub()
        relay = RedisEventRelay(client, hub, "test:")
        await relay.start()
        opened.append((relay, client))
        return hub, relay

    yield start
    for relay, client in opened:
        await relay.close()
        await client.aclose()


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_tokens_stay_local_until_another_gateway_listens(relays) -> None:
    hub, relay = await relays()
    # alone: the state event's PUBLISH reaches only this process's own subscription
    hub.publish("t1", {"state": "running"})
    await _until(lambda: relay._outbox.empty() and not relay._others, "still thought shared")
    for i in range(5):
        hub.publish("t1", {"token": str(i)})
    assert relay.kept_local == 5
    # a second gateway starts: its hello reaches the first before it takes any request
    other_hub, _ = await relays()
    await _until(lambda: relay._others, "the hello did not arrive")
    queue = other_hub.subscribe("t1")
    for i in range(5, 8):
        hub.publish("t1", {"token": str(i)})
    hub.publish("t1", {"state": "done"})
    got = [await asyncio.wait_for(queue.get(), 5) for _ in range(4)]
    assert got == [{"token": "5"}, {"token": "6"}, {"token": "7"}, {"state": "done"}]
    assert relay.kept_local == 5


@pytest.mark.parametrize("opened_at", [True, "soon", float("nan"), float("inf")])
async def test_a_breaker_message_without_a_time_is_ignored(relays, opened_at: object) -> None:
    applied: list[tuple[str, float | None]] = []

    class Router:
        def apply_remote(self, now: float, upstream: str, at: float | None) -> None:
            applied.append((upstream, at))

    class Clock:
        def now(self) -> float:
            return 0.0

    _, relay = await relays()
    relay.router, relay.clock = Router(), Clock()
    relay._breaker("up", opened_at)
    relay._breaker("up", 12)
    relay._breaker("up", None)
    assert applied == [("up", 12.0), ("up", None)]


async def test_close_ends_the_loops_even_when_a_cancel_comes_back_as_a_timeout(relays) -> None:
    # Python 3.11: a cancel that races a timeout inside redis-py comes back as the timeout,
    # which the sender takes for an outage. close() must still end it.
    hub, relay = await relays()
    publishing = asyncio.Event()

    async def slow_publish(message: str) -> None:
        publishing.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RedisTimeoutError("Timeout reading from socket") from None

    relay._publish = slow_publish
    hub.publish("t1", {"state": "running"})
    await asyncio.wait_for(publishing.wait(), 5)
    async with asyncio.timeout(10):
        await relay.close()
    assert relay._tasks == [] and relay.dropped == 1


async def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
        relays, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture) -> None:
    await relays()
    caplog.set_level("WARNING", logger="gateway.relay")

    def said(word: str) -> int:
        return sum(f"task events of other gateways {word}" in r.getMessage()
                   for r in caplog.records)

    redis_server.stop()
    await _until(lambda: said("paused") == 1, "the pause logged")
    await asyncio.sleep(1.2)  # two more reconnect attempts while Redis is away
    redis_server.start()
    await _until(lambda: said("resumed") == 1, "the resumption logged")
    assert said("paused") == 1
