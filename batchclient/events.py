"""Telemetry events: one per request and one per item, handed to a hook.

The Locust harness feeds its statistics from these (``kind == "request"``: name,
response time, status, tokens, cost); ``kind == "balance"`` is the low-balance alert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

EventKind = Literal["request", "item", "balance"]


# Not frozen: one is built per request and per item on the client's hot path, and a frozen
# dataclass pays an object.__setattr__ per field (5x the cost). Treat events as read-only.
@dataclass(slots=True)
class Event:
    """One telemetry event. Times in milliseconds, money in USD, ``at`` virtual seconds.

    For requests ``outcome`` is the classification (ok, retry, never_retry,
    fatal_balance, fatal_auth); for items it is done, cached, skip or dead. ``call_id``
    ties an item to the request whose reply finished it (None for cache hits);
    a request's ``items_ok`` counts the items its reply resolved (None unless ok),
    ``finish_reason`` and ``truncated`` (cut at ``max_tokens``) describe the reply, and
    ``lane`` tells interactive chats from background batches.
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
    call_id: int | None = None
    finish_reason: str | None = None
    truncated: bool = False
    items_ok: int | None = None
    lane: str = "background"


EventHook = Callable[[Event], None]
