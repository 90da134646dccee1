"""The gateway's clock: virtual seconds that every gateway process on a host agrees on.

Virtual time is ``time_scale`` x wall seconds since a fixed epoch (not since process
start), so two processes sharing Redis read the same ``now`` for buckets, windows and leases.
"""

from __future__ import annotations

import asyncio
import time

# 2023-11-14T22:13:20Z: keeps virtual timestamps small enough for exact float strings.
EPOCH_S = 1_700_000_000.0


class GatewayClock:
    """Virtual seconds = ``time_scale`` x (wall - EPOCH_S); sleeps in virtual seconds."""

    __slots__ = ("time_scale",)

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.time_scale = time_scale

    def now(self) -> float:
        """Virtual seconds since the epoch."""
        return self.time_scale * (time.time() - EPOCH_S)

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of virtual time."""
        await asyncio.sleep(max(0.0, seconds) / self.time_scale)

    def wall(self, seconds: float) -> float:
        """Wall seconds standing for ``seconds`` of virtual time."""
        return seconds / self.time_scale
