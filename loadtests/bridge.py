"""asyncio inside gevent: one event loop per Locust process on a real OS thread.

Locust monkey-patches ``threading``; the loop runs on a thread started with the
original ``_thread.start_new_thread``, so it is a real OS thread with its own stack.
Greenlets submit coroutines with ``asyncio.run_coroutine_threadsafe`` and wait without
blocking the gevent hub: the future's done-callback (on the loop thread) wakes a gevent
``AsyncResult`` through a gevent async watcher, so thousands of greenlets can wait at once
(the hub's thread pool has only about ten threads).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import gevent
import gevent.event
import gevent.monkey

T = TypeVar("T")


class AsyncBridge:
    """An asyncio loop on a real OS thread, and gevent-friendly ways to run coroutines on it."""

    def __init__(self) -> None:
        # asyncio imported after the patch would pick gevent's cooperative selector, which
        # cannot block a thread that is not the hub's; use the original one.
        selector = gevent.monkey.get_original("selectors", "DefaultSelector")()
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop(selector)
        # gevent patches ``threading``'s module globals, so even the original Thread class
        # would start a greenlet; the original ``_thread.start_new_thread`` starts a real one.
        start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
        allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
        self._started = allocate_lock()
        self._started.acquire()
        self._finished = allocate_lock()
        self._finished.acquire()
        start_new_thread(self._run, ())
        self._started.acquire(True, 10)
        self._closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.release)
        try:
            self.loop.run_forever()
        finally:
            self._finished.release()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the loop thread soon (for loop-bound objects such as a Runner)."""
        self.loop.call_soon_threadsafe(fn)

    @staticmethod
    def wait(fut: concurrent.futures.Future[T], timeout: float | None = None) -> T:
        """Wait for ``fut`` from a greenlet, yielding to the hub; re-raises its exception.

        Raises ``gevent.Timeout`` after ``timeout`` wall seconds.
        """
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        # An async watcher keeps the hub's loop alive while the greenlet waits (a bare
        # run_callback_threadsafe lets the hub see "nothing to wait for" and raise LoopExit);
        # its send() is the thread-safe wake-up from the asyncio thread.
        watcher = gevent.get_hub().loop.async_()

        def settle() -> None:
            if fut.cancelled():
                result.set_exception(asyncio.CancelledError())
                return
            exc = fut.exception()
            if exc is not None:
                result.set_exception(exc)
            else:
                result.set(fut.result())

        watcher.start(settle)
        fut.add_done_callback(lambda _done: watcher.send())
        try:
            value: T = result.get(timeout=timeout)
        finally:
            watcher.stop()
            watcher.close()
        return value

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Submit ``coro`` and wait for its result from a greenlet."""
        return self.wait(self.submit(coro), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop and join its thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._finished.acquire(True, timeout):
            self.loop.close()


_bridge: AsyncBridge | None = None
_bridge_pid: int | None = None


def get_bridge() -> AsyncBridge:
    """This process's bridge, created on first use (after Locust forks its workers)."""
    global _bridge, _bridge_pid
    if _bridge is None or _bridge_pid != os.getpid():
        _bridge = AsyncBridge()
        _bridge_pid = os.getpid()
    return _bridge
