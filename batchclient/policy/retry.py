"""Retry delays: exponential backoff with full jitter, honouring the server's retry-after.

All delays are virtual seconds; the RNG is passed in so runs are reproducible.
"""

from __future__ import annotations

import random

from batchclient.config import RetrySettings


def full_jitter(attempt: int, rng: random.Random, base_s: float, cap_s: float) -> float:
    """Uniform in [0, min(cap, base * 2**attempt)] (AWS "full jitter"); attempt counts from 0."""
    return rng.uniform(0.0, min(cap_s, base_s * (2.0 ** min(attempt, 60))))


def retry_delay(
    attempt: int,
    rng: random.Random,
    settings: RetrySettings,
    retry_after_s: float | None = None,
) -> float:
    """Delay before retry number ``attempt`` (0-based): the server's retry-after when it
    sent one (never shorter), else backoff with full jitter."""
    jitter = full_jitter(attempt, rng, settings.base_s, settings.cap_s)
    if retry_after_s is not None:
        # A little spread above retry-after so many waiters do not return in one burst.
        return retry_after_s + rng.uniform(0.0, min(settings.base_s, retry_after_s * 0.1 + 1e-9))
    return jitter


def naive_delay(attempt: int, rng: random.Random, settings: RetrySettings) -> float:
    """The naive strategy's reaction to a 429: ``2**n + random()`` seconds, or 0."""
    if settings.naive_sleep == "immediate":
        return 0.0
    return 2.0 ** min(attempt, 10) + rng.random()
