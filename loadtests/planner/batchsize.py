"""Optimal batch size: the size that maximises goodput (items done per virtual minute, with
every retry, skipped item and truncated reply paid for in time).

Risk grows with the batch: the responder's per-item drop rate already applies to every
item, and the per-reply truncation rate stated in the scenario is taken to hold at the
arm's configured size and to scale with the number of items in the reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loadtests.planner.capacity import MIN_SPAN_S, arm_figures
from loadtests.scenario import Scenario, ScenarioError, with_overrides

__all__ = ["SIZES", "optimal_batch_size"]

SIZES = (1, 2, 5, 10, 15, 20, 30, 40, 60, 80)


def optimal_batch_size(scenario: Scenario, arm: str, *, sizes: Sequence[int] = SIZES,
                       sample_items: int = 2000,
                       min_span_s: float = MIN_SPAN_S) -> dict[str, Any]:
    """Plan ``arm`` at each batch size (on a sample spanning at least ``min_span_s`` virtual
    seconds) and return every point and the best by goodput."""
    entry = scenario.arm(arm)
    base_size = int((entry.client.get("batch") or {}).get("max_items", 20))
    provider = entry.providers[0]
    responder = scenario.provider(provider).data.get("responder") or {}
    truncate = float(responder.get("truncate_rate", 0.0))
    points = []
    for size in sizes:
        overrides: dict[str, Any] = {f"arms.{arm}.client.batch.max_items": size}
        if truncate:
            overrides[f"providers.{provider}.responder.truncate_rate"] = min(
                1.0, truncate * size / max(1, base_size))
        try:
            variant = with_overrides(scenario, overrides)
        except ScenarioError:
            continue
        figures = arm_figures(variant, arm, sample_items, min_span_s)
        if figures is None:
            continue
        points.append({
            "batch_size": size,
            "goodput_items_per_min": figures["throughput"]["items_per_min"],
            "retry_amplification": figures["requests"]["retry_amplification"],
            "dead_letter": figures["items"]["dead_letter"],
            "cost_per_item_usd": figures["cost_usd"]["per_item"],
        })
    best = max(points, key=lambda p: p["goodput_items_per_min"], default=None)
    return {"arm": arm, "points": points, "best": best}
