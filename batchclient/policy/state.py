"""Mutable per-item bookkeeping of the engine and the buffer of what it has to hand out."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchclient.events import Event
from batchclient.policy.job import ItemResult
from batchclient.policy.wire import Item


@dataclass(slots=True)
class ItemState:
    """Where one fed item is: its routing, packing sizes, failed attempts and misses."""

    item: Item
    model: str
    key: str
    sizes: tuple[int, int] = (0, 0)
    attempts: int = 0
    misses: int = 0
    last_error: str | None = None
    state: str = "queued"  # queued | inflight | follower | done | dead


@dataclass(slots=True)
class Drained:
    """Finished items and events not yet handed to the driver."""

    results: list[ItemResult] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
