"""Fidelity: the plan of a scenario beside a finished live run of it, per arm, with the
relative error of items/min, the steady items/min, requests/min, 429s, duration and cost."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FIGURES", "fidelity_rows", "fidelity_text"]

# (label, dotted path in an arm's summary object)
FIGURES = (
    ("items/min", "throughput.items_per_min"),
    # the rate of the whole limit windows after the first: neither the first window's head
    # start nor the live side's start-up moves it (compared when both sides have one)
    ("steady/min", "throughput.steady_items_per_min"),
    ("requests/min", "throughput.requests_per_min"),
    ("429s", "requests.http_429"),
    ("duration s", "duration_s"),
    ("cost USD", "cost_usd.total"),
)


# figures a summary may leave null: not compared then, rather than a failed comparison
OPTIONAL = frozenset({"throughput.steady_items_per_min"})


def _dig(node: Any, path: str) -> float | None:
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return float(node) if isinstance(node, int | float) else None


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured; 0 when both are 0; None when unknown."""
    if predicted is None or measured is None:
        return None
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return (predicted - measured) / measured


def fidelity_rows(plan: Mapping[str, Any], live: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per arm present in both summaries and figure: predicted, measured, error."""
    rows = []
    live_arms = {a["name"]: a for a in live.get("arms", [])}
    for arm in plan.get("arms", []):
        other = live_arms.get(arm["name"])
        if other is None:
            continue
        for label, path in FIGURES:
            p, m = _dig(arm, path), _dig(other, path)
            if path in OPTIONAL and (p is None or m is None):
                continue  # a run too short for a steady window on either side
            rows.append({"arm": arm["name"], "figure": label, "predicted": p, "measured": m,
                         "error": relative_error(p, m)})
    return rows


def fidelity_text(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (errors in percent)."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"

    lines = [f"{'arm':<18} {'figure':<13} {'predicted':>12} {'measured':>12} {'error':>8}"]
    for r in rows:
        err = "-" if r["error"] is None else f"{100 * r['error']:+.1f}%"
        lines.append(f"{r['arm']:<18} {r['figure']:<13} {num(r['predicted']):>12} "
                     f"{num(r['measured']):>12} {err:>8}")
    return "\n".join(lines)
