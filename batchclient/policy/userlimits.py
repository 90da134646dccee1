"""Per-user token buckets (requests per minute, tokens per day) by pricing tier.

A service that fronts many users keeps one user from draining the shared provider quota.
Times are virtual seconds; a refusal says how long until the user may try again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tier:
    """Limits of one pricing tier: requests per minute and tokens per day (None: no limit)."""

    rpm: float | None = 10.0
    tokens_per_day: int | None = 100_000


@dataclass(slots=True)
class TokenBucket:
    """Continuous-refill bucket: ``capacity`` units, ``rate_per_s`` refill (virtual)."""

    capacity: float
    rate_per_s: float
    level: float
    last: float = 0.0

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.level = min(self.capacity, self.level + (now - self.last) * self.rate_per_s)
            self.last = now

    def wait_for(self, now: float, amount: float) -> float:
        """Seconds until ``amount`` is available (inf if it never fits)."""
        self._refill(now)
        if amount <= self.level:
            return 0.0
        if amount > self.capacity or self.rate_per_s <= 0:
            return float("inf")
        return (amount - self.level) / self.rate_per_s

    def take(self, now: float, amount: float) -> None:
        """Consume ``amount`` (call only after ``wait_for`` returned 0)."""
        self._refill(now)
        self.level -= amount


@dataclass(frozen=True, slots=True)
class UserDecision:
    """Allowed, or refused with the reason and the virtual seconds until a retry may pass.
    ``stopped``: refused because the lane stopped (a fatal answer), not by a per-user limit:
    ``retry_in_s`` is then the wait until it goes on (a top-up is due), 0 when it stopped
    for good."""

    allowed: bool
    retry_in_s: float = 0.0
    reason: str = ""
    stopped: bool = False


class UserLimits:
    """Buckets per user, created on first sight from the user's tier."""

    def __init__(self, tiers: Mapping[str, Tier], default_tier: str = "free") -> None:
        if default_tier not in tiers:
            raise ValueError(f"default tier {default_tier!r} is not among {sorted(tiers)}")
        self.tiers = dict(tiers)
        self.default_tier = default_tier
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def _for(self, now: float, user: str, tier: str | None) -> tuple[
            TokenBucket | None, TokenBucket | None]:
        buckets = self._buckets.get(user)
        if buckets is None:
            t = self.tiers[tier or self.default_tier]
            rpm = None if t.rpm is None else TokenBucket(t.rpm, t.rpm / 60.0, t.rpm, now)
            day = None if t.tokens_per_day is None else TokenBucket(
                t.tokens_per_day, t.tokens_per_day / 86400.0, t.tokens_per_day, now)
            buckets = (rpm, day)
            self._buckets[user] = buckets
        return buckets

    def admit(self, now: float, user: str, tokens: int, tier: str | None = None) -> UserDecision:
        """Take one request and ``tokens`` from the user's buckets, or refuse (taking nothing)."""
        rpm, day = self._for(now, user, tier)
        wait_r = rpm.wait_for(now, 1) if rpm else 0.0
        wait_t = day.wait_for(now, tokens) if day else 0.0
        if wait_r > 0 or wait_t > 0:
            reason = "requests per minute" if wait_r >= wait_t else "tokens per day"
            return UserDecision(False, max(wait_r, wait_t), f"user {user!r} over {reason}")
        if rpm:
            rpm.take(now, 1)
        if day:
            day.take(now, tokens)
        return UserDecision(True)
