"""Cost meter: charges and balance from ``X-MDB-*`` headers, or usage x price table.

Totals are kept per (model, task); the low-balance threshold fires once per crossing,
before the provider's 402 (the fuel gauge of the third article).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from batchclient.config import Price
from batchclient.policy.wire import Usage


@dataclass(slots=True)
class CostMeter:
    """Running cost of a job in USD; ``prices`` are per provider then model."""

    prices: Mapping[str, Mapping[str, Price]] = field(default_factory=dict)
    low_balance_usd: float | None = None
    total_usd: float = 0.0
    by_model: dict[str, float] = field(default_factory=dict)
    by_task: dict[str, float] = field(default_factory=dict)
    balance_usd: float | None = None
    _alerted: bool = False

    def charge(
        self,
        provider: str,
        model: str,
        task: str,
        headers: Mapping[str, str],
        usage: Usage | None,
    ) -> float:
        """Record one response's charge (USD) and return it."""
        charged: float | None = None
        raw = headers.get("x-mdb-charged-usd")
        if raw is not None:
            try:
                charged = float(raw)
            except ValueError:
                charged = None
        if charged is None:
            price = self.prices.get(provider, {}).get(model)
            charged = 0.0
            if price is not None and usage is not None:
                charged = (usage.prompt_tokens * price.input_per_m
                           + usage.completion_tokens * price.output_per_m) / 1e6
        balance = headers.get("x-mdb-balance-usd")
        if balance is not None:
            with contextlib.suppress(ValueError):
                self.balance_usd = float(balance)
        self.total_usd += charged
        self.by_model[model] = self.by_model.get(model, 0.0) + charged
        self.by_task[task] = self.by_task.get(task, 0.0) + charged
        return charged

    def low_balance_crossed(self) -> bool:
        """True once when the balance first falls below the threshold (re-arms on top-up)."""
        if self.low_balance_usd is None or self.balance_usd is None:
            return False
        if self.balance_usd < self.low_balance_usd:
            if not self._alerted:
                self._alerted = True
                return True
            return False
        self._alerted = False
        return False


class SpendBudget:
    """A spend cap (USD) that every engine of a process shares (a batch job and the chats
    beside it): what they spent, and what their requests in flight hold at their most
    possible cost. A request is sent only if its hold fits beside the others'; when it
    does not, the engine waits for a request in flight to come back, and stops when none is.

    Keys are any value unique to one request of one engine (the engine's id and call id)."""

    __slots__ = ("_held", "cap_usd", "spent_usd")

    def __init__(self, cap_usd: float) -> None:
        self.cap_usd = cap_usd
        self.spent_usd = 0.0
        self._held: dict[object, float] = {}

    @property
    def committed_usd(self) -> float:
        """Spent, plus what the requests in flight hold."""
        return self.spent_usd + sum(self._held.values())

    def fits(self, usd: float) -> bool:
        """Whether a request holding ``usd`` keeps what is committed within the cap."""
        return self.committed_usd + usd <= self.cap_usd

    def holding(self) -> bool:
        """Whether any request of any engine is still in flight against the budget."""
        return bool(self._held)

    def hold(self, key: object, usd: float) -> None:
        """A request is sent: it holds ``usd`` until it is settled."""
        self._held[key] = usd

    def settle(self, key: object, charged: float) -> None:
        """The request of ``key`` came back: it releases its hold and spends ``charged``."""
        self._held.pop(key, None)
        self.spent_usd += charged
