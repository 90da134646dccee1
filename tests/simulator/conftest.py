"""The shell's async tests run twice: on asyncio's default loop (the simulator embedded in
another program's loop) and on the loop ``ratelab serve`` and ``serve_in_thread`` serve on
(``simulator.loop.new_event_loop``, epoll waits to the microsecond)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

from simulator.loop import new_event_loop


@pytest.hookimpl(optionalhook=True)  # the hook exists from pytest-asyncio 1.3 on
def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"default-loop": asyncio.new_event_loop, "serving-loop": new_event_loop}
