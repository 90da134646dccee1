"""Clocks for the asyncio shell: virtual seconds, optionally compressed by ``time_scale``."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What the runner needs of time: read it (virtual seconds) and sleep in it."""

    def now(self) -> float:
        """Virtual seconds since the clock started."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of virtual time."""
        ...


class ScaledClock:
    """Virtual time = ``time_scale`` x wall time since construction (docs/conventions.md):
    with ``time_scale: 60`` one wall second stands for a virtual minute."""

    __slots__ = ("_start", "time_scale")

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.time_scale = time_scale
        self._start = time.monotonic()

    def now(self) -> float:
        """Virtual seconds since the clock started."""
        return self.time_scale * (time.monotonic() - self._start)

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` virtual seconds (``seconds / time_scale`` of wall time)."""
        await asyncio.sleep(max(0.0, seconds) / self.time_scale)

    def wall(self, seconds: float) -> float:
        """Wall seconds that stand for ``seconds`` of virtual time."""
        return seconds / self.time_scale
