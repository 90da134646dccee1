"""Pure limit decisions: per-user token buckets (the provider's window is ``pacing``).

They take ``now`` in virtual seconds and return values; the in-process state keeps their
state in dicts, the Redis state runs the same arithmetic in Lua (``redis_scripts.py``), so
the two agree to the token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.config import TierLimits

DAY_S = 86400.0
WINDOW_S = 60.0
LIMIT_RPM = "requests_per_minute"
LIMIT_TPD = "tokens_per_day"
LIMIT_TOO_BIG = "request_larger_than_tokens_per_day"


@dataclass(frozen=True, slots=True)
class UserDecision:
    """Admitted, or refused by ``limit`` with ``retry_in_s`` virtual seconds to wait."""

    allowed: bool
    limit: str = ""
    retry_in_s: float = 0.0


@dataclass(slots=True)
class UserBuckets:
    """Levels of one user's two buckets and when they were last refilled (virtual s)."""

    requests: float
    tokens: float
    last: float


def full_buckets(tier: TierLimits, now: float) -> UserBuckets:
    """A new user's buckets: full."""
    return UserBuckets(tier.capacity or 0.0, float(tier.tokens_per_day or 0), now)


def admit_user(state: UserBuckets, tier: TierLimits, now: float, tokens: int) -> UserDecision:
    """Take one request and ``tokens`` from ``state`` (mutated), or refuse and take nothing.

    The request bucket holds ``tier.capacity`` requests and refills ``rpm / 60`` per
    second; the token bucket holds ``tokens_per_day`` and refills it over a day.
    """
    elapsed = max(0.0, now - state.last)
    state.last = max(state.last, now)
    req_wait = tok_wait = 0.0
    if tier.rpm is not None:
        cap = tier.capacity or 0.0
        state.requests = min(cap, state.requests + elapsed * tier.rpm / 60.0)
        if state.requests < 1.0:
            req_wait = (1.0 - state.requests) / (tier.rpm / 60.0)
    if tier.tokens_per_day is not None:
        per_day = float(tier.tokens_per_day)
        state.tokens = min(per_day, state.tokens + elapsed * per_day / DAY_S)
        if tokens > per_day:
            return UserDecision(False, LIMIT_TOO_BIG, DAY_S)
        if state.tokens < tokens:
            tok_wait = (tokens - state.tokens) / (per_day / DAY_S)
    if req_wait > 0 or tok_wait > 0:
        limit = LIMIT_RPM if req_wait >= tok_wait else LIMIT_TPD
        return UserDecision(False, limit, max(req_wait, tok_wait))
    if tier.rpm is not None:
        state.requests -= 1.0
    if tier.tokens_per_day is not None:
        state.tokens -= tokens
    return UserDecision(True)


def refusal_message(user: str, tier_name: str, tier: TierLimits, decision: UserDecision,
                    time_scale: float) -> str:
    """Words for a 429: which user limit refused, the tier's figure, when to retry (wall s)."""
    wall = decision.retry_in_s / time_scale
    if decision.limit == LIMIT_RPM:
        what = f"requests per minute ({tier.rpm:g}/min, burst {tier.capacity:g})"
    elif decision.limit == LIMIT_TPD:
        what = f"tokens per day ({tier.tokens_per_day:,} tokens/day)"
    else:
        # no wait admits it: say so, as the provider's "Request too large" does
        return (f"User {user!r} (tier {tier_name!r}) is over the limit on tokens per day: "
                f"one request is larger than the day's {tier.tokens_per_day:,} tokens, so no "
                "retry can succeed; lower max_tokens or shorten the prompt.")
    return (f"User {user!r} (tier {tier_name!r}) is over the limit on {what}; "
            f"retry after {math.ceil(wall * 1000) / 1000:g} s.")
