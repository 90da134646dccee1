"""Telemetry events: one per request and one per item, handed to a hook.

The Locust harness feeds its statistics from these (``kind == "request"``: name,
response time, status, tokens, cost); ``kind == "balance"`` is the low-balance alert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

EventKind = Literal["request", "item", "balance"]


@dataclass(frozen=True, slots=True)
class Event:
    """One telemetry event. Times in milliseconds, money in USD, ``at`` virtual seconds.

    For requests ``outcome`` is the classification (ok, retry, never_retry,
    fatal_balance, fatal_auth); for items it is done, cached, skip or dead.
    """

    kind: EventKind
    name: str
    at: float
    outcome: str
    provider: str = ""
    model: str = ""
    status: int = 0
    response_time_ms: float = 0.0
    ttft_ms: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    items: int = 0
    cost_usd: float = 0.0
    item_id: str | None = None
    error: str | None = None
    balance_usd: float | None = None


EventHook = Callable[[Event], None]
