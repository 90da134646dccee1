"""The alternative users would pick instead of an online job: an offline batch API.

Half the price, results within a 24-hour window, at most 50,000 requests a file (OpenAI's
Batch API terms). Pure arithmetic on an arm's projection; durations in seconds, money USD.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["OfflineTerms", "offline_alternative"]


@dataclass(frozen=True, slots=True)
class OfflineTerms:
    """The offline batch API's terms: price factor, completion window (s), requests a file."""

    price_factor: float = 0.5
    window_s: float = 24 * 3600.0
    max_requests_per_file: int = 50_000


def offline_alternative(arm: Mapping[str, Any],
                        terms: OfflineTerms | None = None) -> dict[str, Any] | None:
    """Beside an arm's projection: the offline batch API's cost, files and worst-case time,
    and which of the two to pick (None when the arm has no projection)."""
    terms = terms or OfflineTerms()
    projection = arm.get("projection") or {}
    items = projection.get("items")
    duration = projection.get("duration_s")
    cost = projection.get("cost_usd")
    per_request = (arm.get("items") or {}).get("done_per_request") or 1.0
    if not items or duration is None or cost is None:
        return None
    requests = math.ceil(items / max(per_request, 1e-9))
    files = max(1, math.ceil(requests / terms.max_requests_per_file))
    offline_cost = cost * terms.price_factor
    deadline = projection.get("deadline_s")
    online_meets = deadline is not None and duration <= deadline
    offline_meets = deadline is not None and terms.window_s <= deadline
    if online_meets and not offline_meets:
        pick, why = "online", "only the online job is sure to meet the deadline"
    elif duration < terms.window_s:
        pick = "online" if not offline_meets else "offline"
        why = ("online finishes sooner than the offline window, at twice the price"
               if pick == "online" else "both meet the deadline; offline costs half")
    else:
        pick, why = "offline", "the online job takes longer than the offline window and costs more"
    return {
        "requests": requests,
        "files": files,
        "cost_usd": offline_cost,
        "worst_duration_s": terms.window_s,
        "online_duration_s": duration,
        "online_cost_usd": cost,
        "saving_usd": cost - offline_cost,
        "pick": pick,
        "why": why,
    }
