"""The event loop the simulator is served on: asyncio's, with timers woken on time.

``ratelab serve`` and ``serve_in_thread`` run on ``new_event_loop``; the benchmark serves
on it too, so that what it measures is what is served.
"""

from __future__ import annotations

import asyncio
import select
import selectors

# select() takes descriptors below FD_SETSIZE only (1024 on Linux).
_FD_SETSIZE = 1024


class _PreciseEpollSelector(selectors.EpollSelector):
    """epoll whose waits end on the microsecond rather than the next millisecond.

    epoll_wait takes whole milliseconds and CPython rounds a timeout up, so on the
    default loop every timer fired 0-1 ms late: a reply due at t was written at
    t + U(0, 1) ms plus the loop's own lag. An epoll descriptor is itself pollable, so a
    wait with a timeout goes through select() (a microsecond timeval) on it and the ready
    events are then read without blocking: one extra system call per idle wait.
    """

    def __init__(self) -> None:
        super().__init__()
        self._precise = self.fileno() < _FD_SETSIZE

    def select(self, timeout: float | None = None
               ) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0 and self._precise:
            select.select([self.fileno()], [], [], timeout)
            timeout = 0
        return super().select(timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop the simulator is served on (``ratelab serve``, ``serve_in_thread``):
    asyncio's own, with timers woken on time to the microsecond where it polls with epoll
    (Linux). Elsewhere asyncio's default loop (kqueue already waits to the nanosecond).
    """
    if hasattr(selectors, "EpollSelector"):
        return asyncio.SelectorEventLoop(_PreciseEpollSelector())
    return asyncio.new_event_loop()
