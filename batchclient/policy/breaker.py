"""Circuit breaker per provider: open on consecutive 5xx/timeouts, probe after a cooldown."""

from __future__ import annotations

from batchclient.config import BreakerSettings


class Breaker:
    """Closed -> open after ``failures`` in a row; half-open after ``cooldown_s`` lets one
    probe through; a success closes it, a failure opens it again. Times are virtual."""

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    def state(self, now: float) -> str:
        """``closed``, ``open`` or ``half_open`` at ``now``."""
        if self.opened_at is None:
            return "closed"
        if now - self.opened_at >= self.settings.cooldown_s:
            return "half_open"
        return "open"

    def allows(self, now: float) -> bool:
        """May a request go to this provider now (half-open: only while no probe is out)."""
        if self.opened_at is None:
            return True  # closed: every dispatch decision asks, mostly this
        state = self.state(now)
        return state == "closed" or (state == "half_open" and not self.probing)

    def on_dispatch(self, now: float) -> None:
        """A request was sent; in half-open state it is the probe."""
        if self.opened_at is not None and self.state(now) == "half_open":
            self.probing = True

    def on_success(self, now: float) -> None:
        """The provider answered (any non-5xx reply counts)."""
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def on_failure(self, now: float) -> None:
        """A 5xx or a timeout."""
        self.failures += 1
        if self.probing or self.failures >= self.settings.failures:
            self.opened_at = now
        self.probing = False

    def opened_elsewhere(self, opened_at: float) -> None:
        """Another process sharing this provider saw it open at ``opened_at``: open as it
        did (its cooldown) unless this breaker opened later; no probe of ours is out."""
        if self.opened_at is None or self.opened_at < opened_at:
            self.opened_at = opened_at
            self.failures = max(self.failures, self.settings.failures)
            self.probing = False

    def reopens_in(self, now: float) -> float:
        """Virtual seconds until a probe may go (0 when it may now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.settings.cooldown_s - now)
