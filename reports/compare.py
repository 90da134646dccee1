"""``ratelab compare RUN_A RUN_B``: two runs' figures side by side, with the change."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from reports.summary import SummaryError, arm_by_name, dig, load_summary

HELP = "Print two runs' figures side by side with the change (RUN is a folder or summary.json)."

FIGURES: tuple[tuple[str, str], ...] = (
    ("items/min", "throughput.items_per_min"),
    ("requests/min", "throughput.requests_per_min"),
    ("tokens/min", "throughput.tokens_per_min"),
    ("bound items/min", "bound.items_per_min"),
    ("efficiency", "bound.efficiency"),
    ("items done", "items.done"),
    ("dead-lettered", "items.dead_letter"),
    ("lost", "items.lost"),
    ("requests", "requests.total"),
    ("429s", "requests.http_429"),
    ("429 rate", "requests.rate_429"),
    ("error rate", "requests.error_rate"),
    ("retry amplification", "requests.retry_amplification"),
    ("tokens/item", "tokens.per_item"),
    ("items/request", "items.per_request"),
    ("latency p50 ms", "latency_ms.p50"),
    ("latency p95 ms", "latency_ms.p95"),
    ("TTFT p95 ms", "ttft_ms.p95"),
    ("cost USD", "cost_usd.total"),
    ("USD/item", "cost_usd.per_item"),
    ("duration s", "duration_s"),
    ("projection s", "projection.duration_s"),
    ("projection USD", "projection.cost_usd"),
)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return ""
    if a == 0:
        return "" if b == 0 else f"{b - a:+.4g}"
    return f"{b - a:+.4g} ({(b - a) / abs(a):+.1%})"


def pairs(
    a: Mapping[str, Any], b: Mapping[str, Any]
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """Arms matched by name; two single-arm runs are matched whatever their names."""
    if len(a["arms"]) == 1 and len(b["arms"]) == 1:
        return [(a["arms"][0], b["arms"][0])]
    out = []
    for arm in a["arms"]:
        other = arm_by_name(b, arm["name"])
        if other is not None:
            out.append((arm, other))
    return out


def compare_text(
    a: Mapping[str, Any], b: Mapping[str, Any], label_a: str = "A", label_b: str = "B"
) -> str:
    """The side-by-side table for every matched arm."""
    blocks = []
    for arm_a, arm_b in pairs(a, b):
        rows = [("figure", label_a, label_b, "change")]
        for title, path in FIGURES:
            va, vb = _num(dig(arm_a, path)), _num(dig(arm_b, path))
            if va is None and vb is None:
                continue
            rows.append(
                (
                    title,
                    "n/a" if va is None else f"{va:.6g}",
                    "n/a" if vb is None else f"{vb:.6g}",
                    _change(va, vb),
                )
            )
        rows.insert(
            1, ("binding", str(dig(arm_a, "bound.binding")), str(dig(arm_b, "bound.binding")), "")
        )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        name = (
            arm_a["name"]
            if arm_a["name"] == arm_b["name"]
            else f"{arm_a['name']} vs {arm_b['name']}"
        )
        lines = [f"arm {name}"]
        lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)).rstrip() for r in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ratelab compare``."""
    parser.add_argument("run_a", metavar="RUN_A", help="run folder or summary.json")
    parser.add_argument("run_b", metavar="RUN_B", help="run folder or summary.json")


def main(args: argparse.Namespace) -> int:
    """Print the comparison; 2 when a summary is unusable or no arm matches."""
    try:
        a, b = load_summary(args.run_a), load_summary(args.run_b)
    except SummaryError as exc:
        print(f"ratelab compare: {exc}", file=sys.stderr)
        return 2
    if not pairs(a, b):
        print("ratelab compare: the runs share no arm name", file=sys.stderr)
        return 2
    print(f"A = {args.run_a} ({a['scenario']}, {a['mode']})")
    print(f"B = {args.run_b} ({b['scenario']}, {b['mode']})\n")
    print(compare_text(a, b))
    return 0
