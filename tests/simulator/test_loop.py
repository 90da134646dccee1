"""The serving event loop (``simulator.loop.new_event_loop``): timers never fire early
(a reply before its configured latency would be a wrong answer; uvloop's millisecond timers
fire up to 1 ms early, which is one reason it is not the serving loop), I/O still wakes it,
and a selector whose descriptor select() cannot take falls back to epoll's own waits. No
timing figures here: benchmarks/bench_simulator.py measures how close to due they fire."""

from __future__ import annotations

import asyncio
import selectors
import socket
import sys

import pytest

from simulator import loop as serving
from simulator.loop import new_event_loop

linux_only = pytest.mark.skipif(not hasattr(selectors, "EpollSelector"), reason="epoll")


def _fire_times(loop: asyncio.AbstractEventLoop, delays: list[float]
                ) -> list[tuple[float, float]]:
    """(due, fired) in loop time for one timer per delay, all scheduled at once."""
    fired: list[tuple[float, float]] = []
    done = loop.create_future()
    start = loop.time()

    def fire(due: float) -> None:
        fired.append((due, loop.time()))
        if len(fired) == len(delays):
            done.set_result(None)

    for delay in delays:
        loop.call_at(start + delay, fire, start + delay)
    loop.run_until_complete(done)
    return fired


def test_timers_fire_in_order_and_never_before_they_are_due() -> None:
    loop = new_event_loop()
    try:
        delays = [0.0003, 0.0009, 0.0011, 0.0025, 0.0001, 0.004]
        fired = _fire_times(loop, delays)
    finally:
        loop.close()
    assert [due for due, _ in fired] == sorted(due for due, _ in fired)
    assert all(at >= due for due, at in fired), fired


@linux_only
def test_socket_readiness_ends_a_wait_with_a_timeout_pending() -> None:
    loop = new_event_loop()
    a, b = socket.socketpair()
    try:
        got = loop.create_future()
        loop.add_reader(a, lambda: got.set_result(a.recv(16)))
        loop.call_later(3600, lambda: None)  # a long timeout: select() waits on it
        loop.call_later(0.01, b.send, b"ping")
        assert loop.run_until_complete(asyncio.wait_for(got, 5)) == b"ping"
    finally:
        loop.remove_reader(a)
        a.close()
        b.close()
        loop.close()


@linux_only
def test_a_descriptor_select_cannot_take_falls_back_to_epoll_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serving, "_FD_SETSIZE", 0)  # every descriptor is "too high"
    selector = serving._PreciseEpollSelector()
    assert not selector._precise
    loop = asyncio.SelectorEventLoop(selector)
    try:
        fired = _fire_times(loop, [0.0005, 0.002])
        assert all(at >= due for due, at in fired), fired
    finally:
        loop.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the serving selector is Linux's")
def test_the_serving_loop_uses_the_microsecond_selector() -> None:
    loop = new_event_loop()
    try:
        assert isinstance(loop._selector, serving._PreciseEpollSelector)  # type: ignore[attr-defined]
        assert loop._selector._precise  # type: ignore[attr-defined]
    finally:
        loop.close()
