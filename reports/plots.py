"""The report's plots as PNG bytes (matplotlib, Agg backend): one function per figure.

Each takes the summary dict and/or the time series rows (``timeseries.csv``) and returns
PNG bytes, or None when the run has nothing to show for it. Time axes are virtual minutes.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

Rows = Sequence[Mapping[str, Any]]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _by_arm(rows: Rows) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        out[str(row["arm"])].append(row)
    return out


def _num(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def _rolling_rate(series: list[Mapping[str, Any]], window_s: float = 60.0) -> list[float]:
    """Items per minute over the trailing ``window_s`` seconds at each bucket."""
    out: list[float] = []
    ts = [float(r["t_s"]) for r in series]
    done = [float(r["items_done"] or 0) for r in series]
    start = 0
    total = 0.0
    bucket = ts[1] - ts[0] if len(ts) > 1 else 1.0
    for i, t in enumerate(ts):
        total += done[i]
        while ts[start] <= t - window_s:
            total -= done[start]
            start += 1
        span = min(window_s, t - ts[0] + bucket)
        out.append(total * 60.0 / span if span > 0 else 0.0)
    return out


def _finish(fig: Figure, ax: Any, ylabel: str, title: str, ncol: int = 1) -> bytes:
    """Label a plot over virtual minutes, add its legend, and render it to PNG bytes."""
    ax.set_xlabel("virtual minutes")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=ncol)
    return _png(fig)


def _against_limit(rows: Rows, value: Callable[[list[Mapping[str, Any]]], list[float]],
                   limit_key: str, what: str, limit_name: str, ylabel: str, title: str,
                   height: float) -> bytes | None:
    """One line per arm of ``value(series)`` over virtual minutes, each against its own
    dashed limit line (the row's ``limit_key``), in the arm's colour."""
    arms = _by_arm(rows)
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(8, height))
    for i, (arm, series) in enumerate(arms.items()):
        color = f"C{i % 10}"
        minutes = [float(r["t_s"]) / 60 for r in series]
        ax.plot(minutes, value(series), color=color, label=f"{arm} {what}")
        limit = _num(series[0].get(limit_key))
        if limit is not None:
            ax.axhline(limit, color=color, linestyle="--", linewidth=1,
                       label=f"{arm} {limit_name}")
    return _finish(fig, ax, ylabel, title)


def throughput_vs_bound(rows: Rows) -> bytes | None:
    """Items per minute (trailing 60 s) over time, each arm against its bound."""
    return _against_limit(rows, _rolling_rate, "bound_items_per_min", "items/min", "bound",
                          "items / min", "Throughput against the bound", 3.6)


def tokens_vs_tpm(rows: Rows) -> bytes | None:
    """Tokens in the rolling 60 s window against the TPM limit."""
    return _against_limit(
        rows, lambda series: [float(r["tokens_window_60s"] or 0) for r in series],
        "tpm_limit", "tokens in window", "TPM limit", "tokens / rolling 60 s",
        "Rolling token window against the TPM limit", 3.2)


def latency_over_time(rows: Rows) -> bytes | None:
    """Request latency percentiles (ms) per bucket, each arm."""
    arms = _by_arm(rows)
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.2))
    styles = (
        ("latency_p50_ms", "-", "p50"),
        ("latency_p95_ms", "--", "p95"),
        ("latency_p99_ms", ":", "p99"),
    )
    for i, (arm, series) in enumerate(arms.items()):
        for key, style, label in styles:
            points = [(float(r["t_s"]) / 60, _num(r.get(key))) for r in series]
            xs = [x for x, y in points if y is not None]
            ys = [y for _, y in points if y is not None]
            ax.plot(xs, ys, linestyle=style, color=f"C{i % 10}", label=f"{arm} {label}")
    return _finish(fig, ax, "latency (ms)", "Latency percentiles over time", ncol=3)


def errors_over_time(rows: Rows) -> bytes | None:
    """429 responses and other errors per bucket, each arm."""
    arms = _by_arm(rows)
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.0))
    for i, (arm, series) in enumerate(arms.items()):
        minutes = [float(r["t_s"]) / 60 for r in series]
        ax.plot(
            minutes,
            [float(r["http_429"] or 0) for r in series],
            color=f"C{i % 10}",
            label=f"{arm} 429s",
        )
        ax.plot(
            minutes,
            [float(r["errors"] or 0) for r in series],
            color=f"C{i % 10}",
            linestyle=":",
            label=f"{arm} errors",
        )
    return _finish(fig, ax, "per bucket", "429s and errors over time")


def cost_over_time(rows: Rows) -> bytes | None:
    """Money spent so far (USD), each arm."""
    arms = _by_arm(rows)
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.0))
    for i, (arm, series) in enumerate(arms.items()):
        minutes = [float(r["t_s"]) / 60 for r in series]
        ax.plot(
            minutes, [float(r["cost_usd_cum"] or 0) for r in series], color=f"C{i % 10}", label=arm
        )
    return _finish(fig, ax, "USD", "Cost accumulating")


def arms_side_by_side(summary: Mapping[str, Any]) -> bytes | None:
    """Items per minute against the bound, and cost per item, for every arm."""
    arms = [a for a in summary.get("arms", []) if a.get("items", {}).get("total")]
    if not arms:
        return None
    names = [a["name"] for a in arms]
    achieved = [a["throughput"]["items_per_min"] or 0.0 for a in arms]
    bounds = [a["bound"]["items_per_min"] or 0.0 for a in arms]
    costs = [a["cost_usd"]["per_item"] or 0.0 for a in arms]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], achieved, width=0.4, label="achieved")
    left.bar([x + 0.2 for x in xs], bounds, width=0.4, label="bound", alpha=0.6)
    left.set_xticks(list(xs), names, rotation=20, fontsize=8)
    left.set_ylabel("items / min")
    left.set_title("Throughput by arm")
    left.legend(fontsize=7)
    right.bar(list(xs), [c * 1e6 for c in costs], color="C2")
    right.set_xticks(list(xs), names, rotation=20, fontsize=8)
    right.set_ylabel("USD per million items")
    right.set_title("Cost per item by arm")
    return _png(fig)


def sweep_curve(summary: Mapping[str, Any]) -> bytes | None:
    """Throughput against the swept setting, the knee marked."""
    sweep = summary.get("sweep")
    if not sweep or not sweep.get("points"):
        return None
    xs = [p["value"] for p in sweep["points"]]
    ys = [p["items_per_min"] for p in sweep["points"]]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(xs, ys, marker="o")
    knee = sweep["knee"]
    ax.scatter(
        [knee["value"]],
        [knee["items_per_min"]],
        s=160,
        facecolors="none",
        edgecolors="red",
        linewidths=2,
        label=f"knee at {knee['value']:g}",
        zorder=3,
    )
    if min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)  # doubling steps, evenly spaced
    ax.set_xlabel(str(sweep.get("key") or "setting"))
    steady = str(sweep.get("figure", "")).endswith("steady_items_per_min")
    ax.set_ylabel("steady items / min" if steady else "items / min")
    ax.set_title("Throughput against the swept setting")
    ax.legend(fontsize=8)
    return _png(fig)


# title -> maker; the report renders every one that has something to show
PLOTS: tuple[tuple[str, str, Callable[[Mapping[str, Any], Rows], bytes | None]], ...] = (
    ("throughput", "Throughput against the bound", lambda s, r: throughput_vs_bound(r)),
    ("tokens", "Rolling tokens against the TPM limit", lambda s, r: tokens_vs_tpm(r)),
    ("latency", "Latency percentiles over time", lambda s, r: latency_over_time(r)),
    ("errors", "429s and errors over time", lambda s, r: errors_over_time(r)),
    ("cost", "Cost accumulating", lambda s, r: cost_over_time(r)),
    ("arms", "Arms side by side", lambda s, r: arms_side_by_side(s)),
    ("sweep", "Sweep curve with the knee", lambda s, r: sweep_curve(s)),
)


def render_all(summary: Mapping[str, Any], rows: Rows) -> list[tuple[str, str, bytes]]:
    """Every plot that applies to this run: (key, title, PNG bytes)."""
    out = []
    for key, title, make in PLOTS:
        png = make(summary, rows)
        if png:
            out.append((key, title, png))
    return out
