"""How many requests may be in flight: fixed, or AIMD on 429s and latency."""

from __future__ import annotations

from batchclient.config import ConcurrencySettings


class Concurrency:
    """In-flight limit. AIMD: +1 per window of successes, halve on a 429 (or on latency
    above ``latency_target_s``), at most one decrease per round-trip (virtual seconds)."""

    def __init__(self, settings: ConcurrencySettings) -> None:
        self.settings = settings
        self.aimd = settings.mode == "aimd"
        self._last_decrease = -1e18
        self._set(float(min(max(settings.limit, settings.min), settings.max)) if self.aimd
                  else float(settings.limit))

    @property
    def limit(self) -> int:
        """Current number of slots."""
        return self._slots

    def on_success(self, now: float, latency_s: float) -> None:
        """A request came back fine after ``latency_s``."""
        if not self.aimd:
            return
        target = self.settings.latency_target_s
        if target is not None and latency_s > target:
            self._decrease(now, latency_s)
            return
        self._set(min(float(self.settings.max), self._limit + 1.0 / self._limit))

    def on_rate_limited(self, now: float, latency_s: float) -> None:
        """A 429 came back."""
        if self.aimd:
            self._decrease(now, latency_s)

    def _decrease(self, now: float, latency_s: float) -> None:
        if now - self._last_decrease < max(latency_s, 1e-9):
            return
        self._last_decrease = now
        self._set(max(float(self.settings.min), self._limit / 2.0))

    def _set(self, limit: float) -> None:
        self._limit = limit
        # the whole slots kept beside the float: dispatch reads them several times a decision
        self._slots = max(1, int(limit))
