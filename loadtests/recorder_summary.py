"""Reduce a Recorder's accumulated figures to the per-arm and per-stage summary objects.

Rates are per virtual minute; latencies in milliseconds; money in USD (docs/summary.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from loadtests.bound import TERM_BINDING

if TYPE_CHECKING:
    from loadtests.bound import Bound
    from loadtests.recorder import Recorder

PERCENTILES = (50, 90, 95, 99)
STEADY_WINDOW_S = 60.0


def steady_rate(
    times: Sequence[float], items: Sequence[int], tokens: Sequence[int],
    window_s: float = STEADY_WINDOW_S,
) -> dict[str, Any]:
    """Items and tokens per virtual minute dispatched in the whole windows after the first.

    The three sequences hold, per successful request, its dispatch time (s), the items it
    resolved and its tokens (a ``Dispatched``'s arrays).
    Windows start at the first dispatch; the first one (the empty rolling window's head start)
    is left out, and so is any window not wholly before the last dispatch (the job's tail), so
    the figure is what the limits allow once they bind, not where the job happened to end.
    ``None`` rates when the job dispatched for less than two whole windows.
    """
    empty: dict[str, Any] = {"items_per_min": None, "tokens_per_min": None, "windows": 0,
                             "start_s": None, "end_s": None}
    if not len(times):
        return empty
    at = np.asarray(times, dtype=float)
    first, last = float(at.min()), float(at.max())
    windows = math.floor((last - first - window_s) / window_s + 1e-9)
    if windows < 1:
        return empty
    lo = first + window_s
    hi = lo + windows * window_s
    inside = (at >= lo) & (at < hi)
    done = int(np.asarray(items, dtype=np.int64)[inside].sum())  # integers: exact sums
    used = int(np.asarray(tokens, dtype=np.int64)[inside].sum())
    minutes = windows * window_s / 60.0
    return {"items_per_min": done / minutes, "tokens_per_min": used / minutes,
            "windows": windows, "start_s": lo, "end_s": hi}


def _pcts(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        empty: dict[str, float | None] = {f"p{q}": None for q in PERCENTILES}
        return empty | {"mean": None, "max": None}
    arr = np.asarray(values, dtype=float) * 1000.0
    out: dict[str, float | None] = {f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}
    out["mean"] = float(arr.mean())
    out["max"] = float(arr.max())
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def arm_summary(rec: Recorder, name: str, pending: int = 0) -> dict[str, Any]:
    """The summary object of arm ``name`` (contract keys of ratelab.summary/1 and more)."""
    info = rec.arms[name]
    acc = rec._acc[name]
    duration = rec.duration_s(name)
    minutes = duration / 60.0
    req = acc.requests
    total = sum(req.values())
    done = acc.items["done"] + acc.items["cached"]
    dead = acc.items["dead_letter"]
    skipped = acc.items["skipped"]
    explicit_lost = acc.items["lost"]
    unaccounted = info.items_total - done - skipped - dead - explicit_lost - pending
    lost = explicit_lost + max(0, unaccounted)
    tokens = acc.tokens_in + acc.tokens_out
    items_per_min = _ratio(done, minutes)
    bound = rec.bound(name)
    needed = total - acc.retries
    goodput = None
    if rec.slo_ms is not None:
        metric, threshold_ms = rec.slo_ms
        pool = acc.ttfts if metric == "ttft" else acc.latencies
        good = sum(1 for v in pool if v * 1000.0 <= threshold_ms)
        goodput = {
            "metric": metric,
            "threshold_ms": threshold_ms,
            "requests": good,
            "requests_per_s": _ratio(good, duration),
            "fraction": _ratio(good, total),
        }
    per_item_cost = _ratio(acc.cost, done)
    steady = steady_rate(acc.dispatched.times, acc.dispatched.items, acc.dispatched.tokens)
    stop = rec.stop_of(name)
    alert = rec.alert_of(name)
    summary: dict[str, Any] = {
        "name": name,
        "strategy": info.strategy,
        "lane": info.lane,
        "duration_s": duration,
        "job_stop": None if stop is None else {"exit_status": stop[0], "reason": stop[1]},
        "low_balance": None if alert is None else {"t_s": alert[0], "balance_usd": alert[1]},
        "items": {
            "total": info.items_total,
            "done": done,
            "cached": acc.items["cached"],
            "skipped": skipped,
            "dead_letter": dead,
            "lost": lost,
            "pending": pending,
            "requeued": acc.items["requeued"],
            "per_request": _ratio(acc.items_sent, total),
            "done_per_request": _ratio(done, total),
            "survival": _ratio(acc.items_resolved, acc.items_ok_sent)
            if acc.items_ok_sent
            else None,
        },
        "requests": {
            "total": total,
            "ok": req["ok"],
            "http_429": req["http_429"],
            "http_402": req["http_402"],
            "http_5xx": req["http_5xx"],
            "http_4xx": req["http_4xx"],
            "timeouts": req["timeout"],
            "errors": req["error"],
            "cancelled": req["cancelled"],
            "retries": acc.retries,
            "truncated": acc.truncated,
            "rate_429": _ratio(req["http_429"], total),
            "error_rate": _ratio(total - req["ok"] - req["http_429"], total),
            "retry_amplification": _ratio(total, needed) if needed > 0 else None,
            # requests needed (not retries) that never got a 2xx: what a user saw fail
            "unrecovered": max(0, needed - req["ok"]),
            "unrecovered_rate": _ratio(max(0, needed - req["ok"]), needed),
            # chats a per-user limit refused before sending: not requests, not in total
            "user_limited": acc.limited,
        },
        "throughput": {
            "items_per_min": items_per_min,
            "requests_per_min": _ratio(total, minutes),
            "tokens_per_min": _ratio(tokens, minutes),
            "input_tokens_per_min": _ratio(acc.tokens_in, minutes),
            "output_tokens_per_min": _ratio(acc.tokens_out, minutes),
            "steady_items_per_min": steady["items_per_min"],
            "steady_tokens_per_min": steady["tokens_per_min"],
            "steady": steady,
        },
        "tokens": {
            "input": acc.tokens_in,
            "output": acc.tokens_out,
            "total": tokens,
            "per_item": _ratio(tokens, done) if done else None,
            "per_request": _ratio(tokens, total),
        },
        "bound": _bound_obj(rec, name, items_per_min, steady["items_per_min"]),
        "latency_ms": _pcts(acc.latencies),
        "ttft_ms": _pcts(acc.ttfts),
        "tpot_ms": _pcts(acc.tpots),
        "goodput": goodput,
        "cost_usd": {
            "total": acc.cost,
            "per_item": per_item_cost if done else None,
            "per_request": _ratio(acc.cost, total),
        },
        "projection": _projection(
            rec, name, *_projection_rate(items_per_min, steady["items_per_min"], bound),
            per_item_cost if done else None, bound is not None,
        ),
    }
    if info.sweep_value is not None:
        summary["sweep_value"] = info.sweep_value
    return summary


def _bound_obj(
    rec: Recorder, name: str, achieved: float, steady: float | None = None
) -> dict[str, Any]:
    bound = rec.bound(name)
    inputs = rec.arms[name].bound
    if bound is None or inputs is None:
        return {
            "items_per_min": None,
            "binding": None,
            "efficiency": None,
            "steady_efficiency": None,
            "terms": {},
            "limits": {},
        }
    limits = {
        k: getattr(inputs, k)
        for k in (
            "tpm",
            "input_tpm",
            "output_tpm",
            "rpm",
            "tokens_per_day",
            "provider_concurrency",
            "client_concurrency",
        )
        if getattr(inputs, k) is not None
    }
    return {
        "items_per_min": bound.items_per_min,
        "binding": bound.binding,
        "efficiency": bound.efficiency(achieved),
        "steady_efficiency": None if steady is None else bound.efficiency(steady),
        "terms": dict(bound.terms),
        "limits": limits | {"keys": inputs.keys},
        "batch_size": inputs.batch_size,
        "latency_s": inputs.latency_s,
        "tokens_per_item": bound.tokens_per_item,
    }


def _projection_rate(
    items_per_min: float, steady: float | None, bound: Bound | None
) -> tuple[float, str]:
    """The rate a long job would keep: the steady rate when measured, else the run's rate
    capped at the bound (a job shorter than the rolling window runs faster than any long
    job can: the empty window's head start), else the run's rate. Under a daily token cap
    the bound itself: a minute's steady state says nothing of a budget a day spends as it
    starts, and a job of days settles at the daily average."""
    if bound is not None and bound.binding == "tokens_per_day":
        return min(items_per_min, bound.items_per_min), "bound"
    if steady is not None:
        return steady, "steady"
    if bound is not None and 0 < bound.items_per_min < items_per_min:
        return bound.items_per_min, "bound"
    return items_per_min, "run"


def _projection(
    rec: Recorder, name: str, items_per_min: float, basis: str, per_item: float | None,
    has_bound: bool,
) -> dict[str, Any]:
    """Time and cost to finish ``project_items`` at ``items_per_min``, and what a deadline
    needs."""
    items = rec.project_items
    deadline = rec.project_deadline_s
    duration = items / items_per_min * 60.0 if items_per_min > 0 else None
    out: dict[str, Any] = {
        "items": items,
        "items_per_min": items_per_min,
        "basis": basis,
        "duration_s": duration,
        "cost_usd": per_item * items if per_item is not None else None,
        "deadline_s": deadline,
        "meets_deadline": duration is not None and duration <= deadline,
        "needed_factor": None,
        "needed_keys": None,
        "needed_tpm": None,
        "needed_rpm": None,
        "other_limit": None,
    }
    if duration is None:
        return out
    factor = duration / deadline
    out["needed_factor"] = factor
    out["needed_keys"] = max(1, math.ceil(factor - 1e-9))
    inputs = rec.arms[name].bound
    bound = rec.bound(name)
    if has_bound and inputs is not None and bound is not None:
        keys = max(1, inputs.keys)
        # More TPM (or RPM) alone meets the deadline only while every other term of the
        # bound allows the rate it needs: past it another limit binds (the client's
        # in-flight cap over the latency, most often) and more TPM buys nothing.
        needed_rate = items / deadline * 60.0
        short = {term: value for term, value in bound.terms.items() if value < needed_rate}
        if inputs.tpm is not None and not any(TERM_BINDING[t] != "tpm" for t in short):
            out["needed_tpm"] = inputs.tpm * keys * factor
        if inputs.rpm is not None and not any(TERM_BINDING[t] != "rpm" for t in short):
            out["needed_rpm"] = inputs.rpm * keys * factor
        stops = {t: v for t, v in short.items() if TERM_BINDING[t] not in ("tpm", "rpm")}
        if stops:
            term = min(stops, key=lambda t: (stops[t], t))
            out["other_limit"] = {"binding": TERM_BINDING[term],
                                  "items_per_min": stops[term]}
    return out


def stage_rows(stages: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage, in order of first activity: cost per request and item, errors, latency."""
    rows = []
    for name, s in sorted(stages.items(), key=lambda kv: kv[1]["first"]):
        duration = s["last"] - s["first"] if math.isfinite(s["first"]) else 0.0
        items = s["items_done"] or s["items"]
        lat = _pcts(s["latencies"])
        rows.append(
            {
                "name": name,
                "start_s": s["first"] if math.isfinite(s["first"]) else None,
                "duration_s": duration,
                "requests": s["requests"],
                "ok": s["ok"],
                "http_429": s["http_429"],
                "user_limited": s["user_limited"],
                "errors": s["errors"],
                "error_rate": _ratio(s["errors"], s["requests"]),
                "rate_429": _ratio(s["http_429"], s["requests"]),
                "requests_per_min": _ratio(s["requests"], duration / 60.0),
                "items": items,
                "cost_usd": s["cost_usd"],
                "cost_per_request_usd": _ratio(s["cost_usd"], s["requests"]),
                "cost_per_item_usd": _ratio(s["cost_usd"], items) if items else None,
                "latency_ms": {k: lat[k] for k in ("p50", "p95", "p99")},
            }
        )
    return rows
