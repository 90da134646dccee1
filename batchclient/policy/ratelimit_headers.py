"""Read a provider's rate-limit headers (OpenAI ``x-ratelimit-*``, Anthropic
``anthropic-ratelimit-*``) and ``retry-after``/``retry-after-ms`` into virtual seconds.

Everything on the wire is wall-clock; durations are multiplied by ``time_scale`` to get
back to virtual time (docs/conventions.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """Seconds of an OpenAI-style reset (``"6m0s"``, ``"20ms"``, ``"1.5s"``) or a number."""
    # Every response carries two resets and the same few values come back again and again
    # (a full window, a second): remembered, bounded like the simulator's formatting cache.
    seconds = _PARSED.get(text, _UNSEEN)
    if seconds is _UNSEEN:
        seconds = _parse_duration(text)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[text] = seconds
    return seconds  # type: ignore[return-value]  # not _UNSEEN


_UNSEEN = object()
_PARSED: dict[str, float | None] = {}
_PARSED_MAX = 4096
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _parse_duration(text: str) -> float | None:
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _reset(value: str | None, date: str | None) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds is not None:
        return seconds
    # Anthropic sends an RFC 3339 instant; without the server's Date we cannot place it.
    if date is None:
        return None
    try:
        reset_at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        from email.utils import parsedate_to_datetime

        return max(0.0, (reset_at - parsedate_to_datetime(date)).total_seconds())
    except (ValueError, TypeError):
        return None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


# Not frozen: one per reply on the hot path (a frozen dataclass's __init__ sets each field
# through object.__setattr__). A value all the same: nothing changes one once made.
@dataclass(slots=True)
class RateHeaders:
    """Limits, remaining budget and reset times (virtual seconds) read from one response."""

    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    # Anthropic's separate input and output token limits (its limits only: the throttle
    # learns them when not configured)
    limit_input_tokens: int | None = None
    limit_output_tokens: int | None = None

    @property
    def empty(self) -> bool:
        """True when the response carried no rate-limit header at all."""
        return self.limit_tokens is None and self.remaining_tokens is None and \
            self.limit_requests is None and self.remaining_requests is None


# the six header names of each family: limit, remaining, reset of tokens then of requests
_FAMILIES = tuple(tuple(prefix + k for k in keys) for prefix, keys in (
    ("x-ratelimit-", ("limit-tokens", "remaining-tokens", "reset-tokens",
                      "limit-requests", "remaining-requests", "reset-requests")),
    ("anthropic-ratelimit-", ("tokens-limit", "tokens-remaining", "tokens-reset",
                              "requests-limit", "requests-remaining", "requests-reset")),
))


_ANTHROPIC = _FAMILIES[1]


def read_rate_headers(headers: Mapping[str, str], time_scale: float = 1.0) -> RateHeaders:
    """Parse either header family (lower-case keys); durations come back in virtual seconds."""
    get = headers.get
    for names in _FAMILIES:
        # the six values unpacked and tested by name (every reply comes here: no list to
        # count and index)
        limit_t, left_t, reset_t, limit_r, left_r, reset_r = map(get, names)
        if limit_t is None and left_t is None and reset_t is None and limit_r is None \
                and left_r is None and reset_r is None:
            continue
        date = get("date")
        rt = _reset(reset_t, date)
        rr = _reset(reset_r, date)
        rate = RateHeaders(
            limit_tokens=_int(limit_t), remaining_tokens=_int(left_t),
            reset_tokens_s=None if rt is None else rt * time_scale,
            limit_requests=_int(limit_r), remaining_requests=_int(left_r),
            reset_requests_s=None if rr is None else rr * time_scale,
        )
        if names is _ANTHROPIC:
            rate.limit_input_tokens = _int(get("anthropic-ratelimit-input-tokens-limit"))
            rate.limit_output_tokens = _int(get("anthropic-ratelimit-output-tokens-limit"))
        return rate
    return RateHeaders()


def retry_after_s(headers: Mapping[str, str], time_scale: float = 1.0) -> float | None:
    """Virtual seconds to wait from ``retry-after-ms`` (preferred) or ``retry-after``."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0) * time_scale
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        try:
            return max(0.0, float(value)) * time_scale
        except ValueError:
            return None
    return None
