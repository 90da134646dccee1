"""Classify a response: ok, retry, never-retry, or fatal (money, authentication).

Item-level outcomes (skip when a reply leaves an item out, dead-letter after too many
failures) are the engine's; this module judges whole requests from status, headers, body.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass

from batchclient.policy.ratelimit_headers import retry_after_s
from batchclient.policy.wire import Response


class Verdict(enum.Enum):
    """What to do with a request's items."""

    OK = "ok"
    RETRY = "retry"
    NEVER_RETRY = "never_retry"
    FATAL_BALANCE = "fatal_balance"
    FATAL_AUTH = "fatal_auth"


@dataclass(frozen=True, slots=True)
class Classified:
    """A verdict, the reason in words, and the server's retry-after (virtual seconds).

    ``too_large``: the request, not its items, was refused for its size (a 429 "Request too
    large", a 400 over the context length or over a per-request cost cap): a smaller batch
    of the same items may pass."""

    verdict: Verdict
    reason: str
    retry_after_s: float | None = None
    rate_limited: bool = False
    server_error: bool = False
    too_large: bool = False


_OK = Classified(Verdict.OK, "ok")
# 400 codes that refuse a request for its size (OpenAI's context length; a per-request cost
# cap, the simulator's and a gateway's)
_TOO_LARGE_CODES = frozenset({"context_length_exceeded", "cost_cap_exceeded"})


def _error_fields(body: str) -> tuple[str, str, str]:
    try:
        data = json.loads(body) if body else None
    except json.JSONDecodeError:
        return "", "", body[:200]
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return "", "", body[:200]
    return (str(error.get("type") or ""), str(error.get("code") or ""),
            str(error.get("message") or ""))


def classify(response: Response, time_scale: float = 1.0) -> Classified:
    """Judge one response; ``time_scale`` converts wire durations to virtual seconds."""
    headers: Mapping[str, str] = response.headers
    if response.error is not None:
        return Classified(Verdict.RETRY, response.error, server_error=True)
    status = response.status
    if 200 <= status < 300:
        return _OK  # a value: every answered request shares it (nothing reads retry-after)
    after = retry_after_s(headers, time_scale)
    etype, code, message = _error_fields(response.body)
    reason = f"HTTP {status}" + (f" {code or etype}" if code or etype else "") + (
        f": {message}" if message else "")
    lowered = f"{etype} {code} {message}".lower()
    if status == 402:
        return Classified(Verdict.FATAL_BALANCE, reason)
    if status in (401, 403):
        return Classified(Verdict.FATAL_AUTH, reason)
    if status == 429 and ("insufficient_quota" in lowered or "spend limit" in lowered
                          or "spend_limit" in lowered):
        return Classified(Verdict.FATAL_BALANCE, reason)
    if status == 429 and "too large" in lowered:
        return Classified(Verdict.NEVER_RETRY, reason, rate_limited=True, too_large=True)
    if status == 400 and code in _TOO_LARGE_CODES:
        return Classified(Verdict.NEVER_RETRY, reason, too_large=True)
    if headers.get("x-should-retry", "").lower() == "false":
        return Classified(Verdict.NEVER_RETRY, reason)
    if status == 429:
        return Classified(Verdict.RETRY, reason, after, rate_limited=True)
    if status >= 500 or status in (408, 409):
        return Classified(Verdict.RETRY, reason, after, server_error=status >= 500)
    return Classified(Verdict.NEVER_RETRY, reason)
