"""SLO search: the highest user count (or rate) whose chosen percentile stays under a threshold.

A pure state machine: double from ``start`` while probes pass, then bisect between the last
passing and the first failing value until they are within ``tolerance`` of each other. The
live runner probes each value for ``step_duration_s`` and reports the measured percentile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Probe:
    """One probe: the value tried, the measured percentile (ms, None if nothing succeeded)."""

    value: float
    measured_ms: float | None
    ok: bool


@dataclass(slots=True)
class SloSearcher:
    """Doubling then bisection over ``[start, max]``; ``integer`` values for user counts."""

    start: float
    max: float
    threshold_ms: float
    tolerance: float = 0.05
    integer: bool = True
    probes: list[Probe] = field(default_factory=list)
    _lo: float | None = None
    _hi: float | None = None
    _next: float | None = None

    def __post_init__(self) -> None:
        if self.start <= 0 or self.max < self.start:
            raise ValueError("need 0 < start <= max")
        self._next = self._round(self.start)

    def _round(self, value: float) -> float:
        return float(max(1, round(value))) if self.integer else value

    def next_value(self) -> float | None:
        """The next value to probe, or None when the search is over."""
        return self._next

    def observe(self, measured_ms: float | None) -> None:
        """Record the result of probing ``next_value()``; ``None`` (no success) fails."""
        value = self._next
        if value is None:
            raise RuntimeError("the search is over")
        ok = measured_ms is not None and measured_ms <= self.threshold_ms
        self.probes.append(Probe(value, measured_ms, ok))
        if ok:
            self._lo = value
        else:
            self._hi = value
        self._next = self._decide()

    def _decide(self) -> float | None:
        lo, hi = self._lo, self._hi
        if hi is None:
            assert lo is not None
            if lo >= self.max:
                return None
            return self._round(min(self.max, lo * 2))
        if lo is None:
            # even the start fails: bisect down towards the smallest value
            if hi <= (1 if self.integer else self.start * self.tolerance):
                return None
            lo_bound = 0.0
        else:
            lo_bound = lo
        if self.integer and hi - lo_bound <= 1:
            return None
        if not self.integer and (hi - lo_bound) <= self.tolerance * hi:
            return None
        mid = self._round((lo_bound + hi) / 2)
        if mid in (lo_bound, hi) or mid <= 0:
            return None
        if hi - lo_bound <= self.tolerance * hi and lo is not None:
            return None
        return mid

    @property
    def best(self) -> float | None:
        """The highest value that met the SLO (None if none did)."""
        return self._lo


def percentile_ms(values_s: Sequence[float], q: float) -> float | None:
    """The ``q`` percentile of durations in seconds, in milliseconds (None when empty)."""
    if not values_s:
        return None
    value = float(np.percentile(np.asarray(values_s, dtype=float), q)) * 1000.0
    return value if math.isfinite(value) else None
