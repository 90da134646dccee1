"""Rate-limit and retry headers in the provider's style; durations are rendered wall-clock.

Every duration passed in is virtual seconds; renderers divide by ``time_scale``
(docs/conventions.md: everything on the wire is wall-clock).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from datetime import UTC, datetime

from simulator.model.limits import LimitState, Window

# Rendered durations by whole milliseconds: a busy window renders the same few values
# (a full minute, a second) on every response. Bounded: cleared when it fills up.
_DURATIONS: dict[int, str] = {}
_DURATIONS_MAX = 4096


def format_duration(seconds: float) -> str:
    """Go-style duration as OpenAI sends it, to the ms: ``20ms``, ``1.574s``, ``6m0s``."""
    ms = math.ceil(seconds * 1000.0 - 1e-6)
    text = _DURATIONS.get(ms)
    if text is None:
        text = _render_ms(max(0, ms))
        if len(_DURATIONS) >= _DURATIONS_MAX:
            _DURATIONS.clear()
        _DURATIONS[ms] = text
    return text


def _render_ms(ms: int) -> str:
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, frac = divmod(ms, 1000)
    s = f"{secs}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{s}"
    if minutes:
        return f"{minutes}m{s}"
    return s


def rfc3339(unix_s: float) -> str:
    """An RFC 3339 UTC timestamp with second precision, e.g. ``2024-05-01T12:00:07Z``."""
    return datetime.fromtimestamp(math.ceil(unix_s), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def retry_headers(wait_s: float, time_scale: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up) and ``retry-after-ms`` for a virtual wait."""
    wall = wait_s / time_scale
    ms = max(1, math.ceil(wall * 1000.0 - 1e-6))
    return {"retry-after": str(max(1, math.ceil(ms / 1000.0))), "retry-after-ms": str(ms)}


def _remaining(window: Window, now: float) -> int:
    return max(0, int(window.capacity - window.used(now) + 1e-9))


@functools.lru_cache(maxsize=1024)
def _capacity_text(capacity: float) -> str:
    """``str(int(capacity))``, memoised: a provider has a handful of capacities."""
    return str(int(capacity))


def _no_headers(state: LimitState, now: float, out: dict[str, str]) -> None:
    """The renderer of a style without rate-limit headers."""


# OpenAI's header names per window: (limit, remaining, reset) of requests, then of tokens
_OPENAI_NAMES = (
    ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
     "x-ratelimit-reset-requests"),
    ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
)
# what the OpenAI style renders of one limit state: per window it has, the window, its
# three header names and its limit's text
_OpenAIPlan = tuple[tuple[Window, str, str, str, str], ...]


class HeaderRenderer:
    """Renders the rate-limit headers of one provider's style from a key+model limit state."""

    __slots__ = ("_openai_plans", "epoch_s", "style", "time_scale")

    def __init__(self, style: str, time_scale: float, epoch_s: float):
        self.style = style
        self.time_scale = time_scale
        self.epoch_s = epoch_s
        # per limit state (a key on a model: a handful a provider), what _openai renders of
        # it: its windows and capacities are fixed when it is made, so the names and limit
        # texts are looked out once, not on every reply
        self._openai_plans: dict[LimitState, _OpenAIPlan] = {}

    def wall(self, now: float) -> float:
        """Unix time (wall-clock) of virtual time ``now``."""
        return self.epoch_s + now / self.time_scale

    def rate_headers(self, state: LimitState, now: float, out: dict[str, str]) -> None:
        """Add the style's rate-limit headers describing ``state`` at ``now`` to ``out``."""
        if self.style == "openai":
            self._openai(state, now, out)
        elif self.style == "anthropic":
            self._anthropic(state, now, out)

    def renderer(self) -> Callable[[LimitState, float, dict[str, str]], None]:
        """``rate_headers`` resolved once for the style: the function a hot path calls."""
        if self.style == "openai":
            return self._openai
        if self.style == "anthropic":
            return self._anthropic
        return _no_headers

    def _openai(self, state: LimitState, now: float, out: dict[str, str]) -> None:
        # ``_remaining`` inlined: every 200 and 429 renders these
        plan = self._openai_plans.get(state)
        if plan is None:
            plan = self._openai_plans[state] = tuple(
                (window, limit, left, reset, _capacity_text(window.capacity))
                for window, (limit, left, reset) in zip((state.requests, state.tokens),
                                                        _OPENAI_NAMES, strict=True)
                if window is not None)
        scale = self.time_scale
        for window, limit, left, reset, capacity_text in plan:
            out[limit] = capacity_text
            remaining = int(window.capacity - window.used(now) + 1e-9)
            out[left] = str(remaining if remaining > 0 else 0)
            out[reset] = format_duration(window.reset_in(now) / scale)

    def _anthropic(self, state: LimitState, now: float, out: dict[str, str]) -> None:
        for part, window, rounded in (("requests", state.requests, False),
                                      ("tokens", state.tokens, True),
                                      ("input-tokens", state.input, True),
                                      ("output-tokens", state.output, True)):
            if window is None:
                continue
            remaining = _remaining(window, now)
            if rounded:
                remaining = (remaining + 500) // 1000 * 1000  # nearest thousand
            out[f"anthropic-ratelimit-{part}-limit"] = str(int(window.capacity))
            out[f"anthropic-ratelimit-{part}-remaining"] = str(remaining)
            out[f"anthropic-ratelimit-{part}-reset"] = rfc3339(
                self.wall(now + window.reset_in(now)))
