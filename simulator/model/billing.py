"""Prepaid balances per key, prices in USD per million tokens, and the charge headers."""

from __future__ import annotations

import functools

from simulator.model.config import ModelProfile

CHARGED_HEADER = "X-MDB-Charged-USD"
BALANCE_HEADER = "X-MDB-Balance-USD"


def cost_usd(model: ModelProfile, prompt_tokens: int, completion_tokens: int) -> float:
    """USD price of a request on ``model``."""
    return (prompt_tokens * model.input_usd_per_mtok
            + completion_tokens * model.output_usd_per_mtok) / 1_000_000.0


def format_usd(usd: float) -> str:
    """A decimal string with up to 10 decimals, as the charge headers carry it."""
    text = f"{usd:.10f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


# Charges rendered by value: a workload's requests cost a handful of distinct amounts.
@functools.lru_cache(maxsize=4096)
def _charge_text(usd: float) -> str:
    """``format_usd(usd)``, memoised."""
    return format_usd(usd)


class Account:
    """One key's money: balance in USD (None = unlimited) and what it has spent."""

    __slots__ = ("balance_usd", "initial_usd", "spent_usd")

    def __init__(self, balance_usd: float | None):
        self.initial_usd = balance_usd
        self.balance_usd = balance_usd
        self.spent_usd = 0.0

    def exhausted(self) -> bool:
        """True once the balance is spent (<= 0): the next request is refused, uncharged."""
        return self.balance_usd is not None and self.balance_usd <= 1e-12

    def charge(self, usd: float) -> None:
        """Charge ``usd``; the balance may dip below zero by this request's cost."""
        self.spent_usd += usd
        if self.balance_usd is not None:
            self.balance_usd -= usd

    def refund(self, usd: float) -> None:
        """Give back ``usd`` (tokens planned but never delivered)."""
        self.charge(-usd)

    def topup(self, usd: float) -> float:
        """Add ``usd`` to the balance; returns the new balance (inf when unlimited)."""
        if self.balance_usd is None:
            return float("inf")
        self.balance_usd += usd
        return self.balance_usd

    def headers(self, charged_usd: float, out: dict[str, str]) -> None:
        """Add the charge header, and the balance header when the balance is limited."""
        out[CHARGED_HEADER] = _charge_text(charged_usd)
        if self.balance_usd is not None:
            out[BALANCE_HEADER] = format_usd(self.balance_usd)
