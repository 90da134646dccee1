"""A pure accumulator of run events: the live runner and the planner feed it the same events.

Events are neutral (virtual time, arm, outcome, tokens, cost); the recorder knows nothing of
Locust, SimPy or HTTP. It produces the ``timeseries.csv`` rows (one per arm and time bucket)
and the ``summary.json`` dict (schema ``ratelab.summary/1``, see docs/summary.md). Events may
arrive in any order: everything is bucketed by virtual time and reduced at the end.
"""

from __future__ import annotations

import csv
import math
from array import array
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchclient.policy.job import EXIT_INTERRUPTED
from loadtests.bound import Bound, BoundInputs, throughput_bound
from loadtests.scenario_model import Scenario
from reports.summary import SCHEMA, evaluate_expect, find_knee

REQUEST_OUTCOMES = (
    "ok",
    "http_429",
    "http_402",
    "http_5xx",
    "http_4xx",
    "timeout",
    "error",
    "cancelled",
)
ITEM_OUTCOMES = ("done", "cached", "skipped", "dead_letter", "lost", "requeued")
TIMESERIES_COLUMNS = (
    "t_s",
    "arm",
    "items_done",
    "items_done_cum",
    "items_per_min",
    "bound_items_per_min",
    "requests",
    "ok",
    "http_429",
    "errors",
    "tokens_in",
    "tokens_out",
    "tokens_window_60s",
    "tpm_limit",
    "cost_usd_cum",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p95_ms",
)


@dataclass(slots=True)
class Event:
    """One request or item event, in virtual seconds.

    A value (nothing changes one once made) but not frozen: a plan makes two or three per
    request, and a frozen dataclass's __init__ sets each of its 15 fields through
    object.__setattr__.

    ``kind="request"``: a request finished at ``t`` with ``outcome`` in REQUEST_OUTCOMES after
    ``latency_s`` (``ttft_s`` if streamed), carrying ``items`` items of which ``items_ok`` were
    resolved from its reply; ``retry`` marks a resend. ``kind="item"``: ``items`` items reached
    a final ``outcome`` in ITEM_OUTCOMES (``requeued`` counts an item left for the next pass).
    ``kind="limited"``: a chat a per-user limit refused before it was sent (no request: it
    is counted apart, as ``requests.user_limited``, live and planned alike).
    """

    t: float
    kind: str
    arm: str
    outcome: str
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    items: int = 1
    items_ok: int | None = None
    cost_usd: float = 0.0
    retry: bool = False
    truncated: bool = False
    stage: str | None = None


@dataclass(frozen=True, slots=True)
class ArmInfo:
    """What the recorder must know of an arm: its items, its bound inputs, thresholds, lane."""

    name: str
    strategy: str
    items_total: int = 0
    bound: BoundInputs | None = None
    thresholds: Mapping[str, float] = field(default_factory=dict)
    lane: str = "batch"
    sweep_value: float | None = None


def outcome_for_status(status: int, timed_out: bool = False) -> str:
    """The request outcome for an HTTP status (0 = no response): ``ok``, ``http_429``, ..."""
    if timed_out:
        return "timeout"
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "http_429"
    if status == 402:
        return "http_402"
    if status >= 500:
        return "http_5xx"
    if status >= 400:
        return "http_4xx"
    return "error"


def _floats() -> array[float]:
    return array("d")


class Dispatched:
    """(dispatch time s, items resolved, tokens) of every successful request, as three
    parallel arrays: 24 bytes a request where a list of tuples of boxed numbers took about
    120 (a plan of a month of chat traffic holds millions)."""

    __slots__ = ("items", "times", "tokens")

    def __init__(self) -> None:
        self.times = array("d")
        self.items = array("q")
        self.tokens = array("q")

    def append(self, entry: tuple[float, int, int]) -> None:
        """Add one request's (dispatch time, items resolved, tokens)."""
        t, items, tokens = entry
        self.times.append(t)
        self.items.append(items)
        self.tokens.append(tokens)


class _ArmAcc:
    """Per-arm totals, per-bucket series and raw latencies (arrays of doubles: 8 bytes a
    value where a list of floats takes 32)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = defaultdict(int)
        self.items: dict[str, int] = defaultdict(int)
        self.retries = 0
        self.truncated = 0
        self.limited = 0  # chats refused by a per-user limit, never sent
        self.items_sent = 0
        self.items_ok_sent = 0
        self.items_resolved = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.cost = 0.0
        self.latencies = _floats()
        self.ttfts = _floats()
        self.tpots = _floats()
        # (dispatch time, items resolved, tokens) of every successful request: steady rate
        self.dispatched = Dispatched()
        self.first = math.inf
        self.last = -math.inf
        self.bucket: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.bucket_lat: dict[int, array[float]] = defaultdict(_floats)
        self.bucket_ttft: dict[int, array[float]] = defaultdict(_floats)


class Recorder:
    """Accumulate events per arm and produce time series rows and the summary dict."""

    def __init__(
        self,
        scenario: str,
        mode: str,
        arms: Sequence[ArmInfo],
        *,
        bucket_s: float = 1.0,
        project_items: int = 2_000_000,
        project_deadline_s: float = 4 * 3600.0,
        slo_ms: tuple[str, float] | None = None,
        tolerances: Mapping[str, float] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if mode not in ("live", "plan"):
            raise ValueError(f"mode must be 'live' or 'plan', got {mode!r}")
        if bucket_s <= 0:
            raise ValueError("bucket_s must be > 0")
        self.scenario = scenario
        self.mode = mode
        self.arms = {a.name: a for a in arms}
        self.bucket_s = bucket_s
        self.project_items = project_items
        self.project_deadline_s = project_deadline_s
        self.slo_ms = slo_ms
        self.tolerances = dict(tolerances or {})
        self.meta = dict(meta or {})
        self._acc: dict[str, _ArmAcc] = {a.name: _ArmAcc() for a in arms}
        self._spans: dict[str, list[float | None]] = {a.name: [None, None] for a in arms}
        # why an arm's job stopped before its items were settled: (exit status, reason)
        self._stops: dict[str, tuple[int, str]] = {}
        self._alerts: dict[str, tuple[float, float | None]] = {}
        self._stages: dict[str, dict[str, Any]] = {}
        self._bounds: dict[str, Bound | None] = {a.name: self._bound(a) for a in arms}

    @staticmethod
    def _bound(arm: ArmInfo) -> Bound | None:
        if arm.bound is None:
            return None
        try:
            return throughput_bound(arm.bound)
        except ValueError:
            return None

    def bound(self, arm: str) -> Bound | None:
        """The throughput bound of ``arm`` (None when its inputs give none)."""
        return self._bounds[arm]

    def job_stopped(self, arm: str, status: int, reason: str) -> None:
        """Record that ``arm``'s job stopped with a non-zero client exit ``status`` (a 402,
        the spend cap, replies that answer nothing...) and why; the first one counts. An
        interruption (130) is the run's, told by its ``stopped``, not the job's."""
        if status and status != EXIT_INTERRUPTED and arm not in self._stops:
            self._stops[arm] = (status, reason)

    def balance_alert(self, arm: str, t: float, balance_usd: float | None) -> None:
        """Record that ``arm``'s client saw its balance fall below its ``low_balance_usd``
        (the fuel gauge's alert) at virtual time ``t``; the first one counts."""
        self._alerts.setdefault(arm, (t, balance_usd))

    def alert_of(self, arm: str) -> tuple[float, float | None] | None:
        """(t, balance) of ``arm``'s low-balance alert, else None."""
        return self._alerts.get(arm)

    def stop_of(self, arm: str) -> tuple[int, str] | None:
        """(exit status, reason) of ``arm``'s job when it stopped early, else None."""
        return self._stops.get(arm)

    def mark(self, arm: str, start_s: float | None = None, end_s: float | None = None) -> None:
        """Set the virtual span of an arm's job explicitly (else the events' span is used)."""
        span = self._spans[arm]
        if start_s is not None:
            span[0] = start_s
        if end_s is not None:
            span[1] = end_s

    def add_many(self, events: Iterable[Event]) -> None:
        """Add every event of ``events``."""
        for event in events:
            self.add(event)

    def add(self, event: Event) -> None:
        """Account one event (unknown arms are refused: a typo must not vanish from the figures)."""
        acc = self._acc.get(event.arm)
        if acc is None:
            raise KeyError(f"event for unknown arm {event.arm!r}")
        index = int(event.t // self.bucket_s)
        row = acc.bucket[index]
        if event.kind == "item":
            if event.outcome not in ITEM_OUTCOMES:
                raise ValueError(f"unknown item outcome {event.outcome!r}")
            acc.items[event.outcome] += event.items
            if event.outcome in ("done", "cached"):
                row["items_done"] += event.items
            # comparisons, not max()/min() calls: two or three events a request come here
            t = event.t
            if t > acc.last:
                acc.last = t
            if t < acc.first:
                acc.first = t
            if event.stage is not None:
                self._stage(event.stage)["items_done"] += (
                    event.items if event.outcome in ("done", "cached") else 0
                )
            return
        if event.kind == "limited":
            acc.limited += 1
            if event.stage is not None:
                self._stage(event.stage)["user_limited"] += 1
            return
        if event.kind != "request":
            raise ValueError(f"unknown event kind {event.kind!r}")
        # each field read once into a local (a plan adds one of these per request; the
        # same sums in the same order)
        outcome, t, latency_s = event.outcome, event.t, event.latency_s
        items, tokens_in, tokens_out, cost = (event.items, event.tokens_in, event.tokens_out,
                                              event.cost_usd)
        if outcome not in REQUEST_OUTCOMES:
            raise ValueError(f"unknown request outcome {outcome!r}")
        ok = outcome == "ok"
        acc.requests[outcome] += 1
        acc.retries += event.retry
        acc.truncated += event.truncated
        acc.items_sent += items
        sent = t - latency_s
        if ok:
            resolved = items if event.items_ok is None else event.items_ok
            acc.items_ok_sent += items
            acc.items_resolved += resolved
            acc.dispatched.append((sent, resolved, tokens_in + tokens_out))
        acc.tokens_in += tokens_in
        acc.tokens_out += tokens_out
        acc.cost += cost
        if sent < acc.first:
            acc.first = sent
        if t > acc.last:
            acc.last = t
        row["requests"] += 1
        row["ok"] += ok
        row["http_429"] += outcome == "http_429"
        row["errors"] += outcome not in ("ok", "http_429")
        row["tokens_in"] += tokens_in
        row["tokens_out"] += tokens_out
        row["cost_usd"] += cost
        if ok:
            acc.latencies.append(latency_s)
            acc.bucket_lat[index].append(latency_s)
            ttft_s = event.ttft_s
            if ttft_s is not None:
                acc.ttfts.append(ttft_s)
                acc.bucket_ttft[index].append(ttft_s)
                if tokens_out > 1:
                    acc.tpots.append((latency_s - ttft_s) / (tokens_out - 1))
        if event.stage is not None:
            stage = self._stage(event.stage)
            stage["requests"] += 1
            stage["ok"] += ok
            stage["http_429"] += outcome == "http_429"
            stage["errors"] += outcome not in ("ok", "http_429")
            stage["cost_usd"] += cost
            stage["items"] += (
                event.items_ok
                if event.items_ok is not None
                else (items if ok else 0)
            )
            stage["first"] = min(stage["first"], sent)
            stage["last"] = max(stage["last"], t)
            if ok:
                stage["latencies"].append(latency_s)

    def _stage(self, name: str) -> dict[str, Any]:
        if name not in self._stages:
            self._stages[name] = {
                "requests": 0,
                "ok": 0,
                "http_429": 0,
                "errors": 0,
                "user_limited": 0,
                "cost_usd": 0.0,
                "items": 0,
                "items_done": 0,
                "first": math.inf,
                "last": -math.inf,
                "latencies": _floats(),
            }
        return self._stages[name]

    def duration_s(self, arm: str) -> float:
        """The arm's job span in virtual seconds (explicit marks win over the events' span)."""
        acc = self._acc[arm]
        start, end = self._spans[arm]
        start = acc.first if start is None else start
        end = acc.last if end is None else end
        if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
            return 0.0
        return end - start

    def timeseries_rows(self) -> list[dict[str, Any]]:
        """One row per arm and bucket, from the first bucket with events to the last (virtual s)."""
        rows: list[dict[str, Any]] = []
        window = max(1, round(60.0 / self.bucket_s))
        for name, acc in self._acc.items():
            if not acc.bucket:
                continue
            bound = self._bounds[name]
            tpm_limit = self._tpm_limit(name)
            lo, hi = min(acc.bucket), max(acc.bucket)
            done_cum = 0.0
            cost_cum = 0.0
            recent: list[float] = []
            for index in range(lo, hi + 1):
                b = acc.bucket.get(index, {})
                done = b.get("items_done", 0.0)
                done_cum += done
                cost_cum += b.get("cost_usd", 0.0)
                recent.append(b.get("tokens_in", 0.0) + b.get("tokens_out", 0.0))
                if len(recent) > window:
                    recent.pop(0)
                lat = acc.bucket_lat.get(index, ())
                ttft = acc.bucket_ttft.get(index, ())
                rows.append(
                    {
                        "t_s": round((index + 1) * self.bucket_s, 6),
                        "arm": name,
                        "items_done": int(done),
                        "items_done_cum": int(done_cum),
                        "items_per_min": done * 60.0 / self.bucket_s,
                        "bound_items_per_min": bound.items_per_min if bound else None,
                        "requests": int(b.get("requests", 0)),
                        "ok": int(b.get("ok", 0)),
                        "http_429": int(b.get("http_429", 0)),
                        "errors": int(b.get("errors", 0)),
                        "tokens_in": int(b.get("tokens_in", 0)),
                        "tokens_out": int(b.get("tokens_out", 0)),
                        "tokens_window_60s": int(sum(recent)),
                        "tpm_limit": tpm_limit,
                        "cost_usd_cum": cost_cum,
                        "latency_p50_ms": _pct(lat, 50),
                        "latency_p95_ms": _pct(lat, 95),
                        "latency_p99_ms": _pct(lat, 99),
                        "ttft_p95_ms": _pct(ttft, 95),
                    }
                )
        return rows

    def _tpm_limit(self, arm: str) -> float | None:
        info = self.arms[arm].bound
        if info is None or info.tpm is None:
            return None
        return info.tpm * max(1, info.keys)

    def summary(
        self, *, partial: bool = False, pending: Mapping[str, int] | None = None
    ) -> dict[str, Any]:
        """The ``ratelab.summary/1`` dict; ``pending`` items (per arm) are not counted lost."""
        from loadtests.recorder_summary import arm_summary, stage_rows

        arms = [arm_summary(self, name, pending=(pending or {}).get(name, 0)) for name in self.arms]
        thresholds = {a.name: dict(a.thresholds) for a in self.arms.values() if a.thresholds}
        checks = evaluate_expect(arms, thresholds)
        summary: dict[str, Any] = {
            "schema": SCHEMA,
            "scenario": self.scenario,
            "mode": self.mode,
            "partial": partial,
            **self.meta,
            "arms": arms,
            "stages": stage_rows(self._stages),
            "expect": {"arms": thresholds, "tolerances": self.tolerances},
            "checks": [c.as_dict() for c in checks],
            "ok": all(c.ok for c in checks),
        }
        sweep = _sweep(
            arms, [self.arms[a["name"]].sweep_value for a in arms], self.meta.get("sweep_key")
        )
        if sweep is not None:
            summary["sweep"] = sweep
        return summary


def _pct(values: Sequence[float], q: float) -> float | None:
    """The ``q`` percentile of ``values`` seconds, in milliseconds (None when empty)."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q)) * 1000.0


def _sweep(
    arms: Sequence[Mapping[str, Any]], values: Sequence[float | None], key: Any
) -> dict[str, Any] | None:
    points = [(v, a) for v, a in zip(values, arms, strict=True) if v is not None]
    if len(points) < 2:
        return None
    points.sort(key=lambda p: p[0])
    xs = [float(v) for v, _ in points]
    # the steady rate when every point has one: the first window's head start would
    # otherwise flatter the points whose jobs fit in it
    steady = all(a["throughput"].get("steady_items_per_min") is not None for _, a in points)
    metric = "steady_items_per_min" if steady else "items_per_min"
    ys = [float(a["throughput"][metric]) for _, a in points]
    errs = [float(a["requests"]["error_rate"] + a["requests"]["rate_429"]) for _, a in points]
    knee = find_knee(xs, ys, errs)
    return {
        "key": key,
        "figure": f"throughput.{metric}",
        "points": [
            {
                "value": x,
                "arm": a["name"],
                "items_per_min": y,
                "requests_per_min": a["throughput"]["requests_per_min"],
                "error_rate": e,
                "latency_p95_ms": a["latency_ms"]["p95"],
            }
            for x, y, e, (_, a) in zip(xs, ys, errs, points, strict=True)
        ],
        "knee": {
            "index": knee,
            "value": xs[knee],
            "arm": points[knee][1]["name"],
            "items_per_min": ys[knee],
        },
    }


def write_timeseries_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write time series rows as CSV with the TIMESERIES_COLUMNS header (empty cells for None)."""
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(TIMESERIES_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if row.get(k) is None else row.get(k)) for k in TIMESERIES_COLUMNS}
            )


def recorder_for(
    scenario: Scenario,
    mode: str,
    bounds: Mapping[str, BoundInputs],
    *,
    bucket_s: float = 1.0,
    sweep_values: Mapping[str, float] | None = None,
    sweep_key: str | None = None,
) -> Recorder:
    """A Recorder for ``scenario``: batch arms own the job's items, thresholds from ``expect:``.

    ``bounds`` gives each arm's bound inputs (the runner knows the parsed limits and the
    client's batch size); arms missing from it get no bound.
    """
    batch = scenario.load.batch
    job_items = (batch.items or scenario.workload.items) if batch else 0
    batch_arms = set(batch.arms) if batch else set()
    infos = [
        ArmInfo(
            name=arm.name,
            strategy=arm.strategy,
            items_total=job_items if arm.name in batch_arms else 0,
            bound=bounds.get(arm.name),
            thresholds=scenario.expect.for_arm(arm.name),
            lane="batch" if arm.name in batch_arms else "interactive",
            sweep_value=(sweep_values or {}).get(arm.name),
        )
        for arm in scenario.arms
    ]
    slo = scenario.load.slo_search
    meta: dict[str, Any] = {
        "description": scenario.description,
        "seed": scenario.seed,
        "time_scale": scenario.time_scale,
        "workload": {
            "items": scenario.workload.items,
            "project_items": scenario.workload.project_items,
            "project_deadline_s": scenario.workload.project_deadline_s,
            "system_prompt_tokens": scenario.workload.system_prompt_tokens,
        },
    }
    if sweep_key is not None:
        meta["sweep_key"] = sweep_key
    return Recorder(
        scenario.name,
        mode,
        infos,
        bucket_s=bucket_s,
        project_items=scenario.workload.project_items,
        project_deadline_s=scenario.workload.project_deadline_s,
        slo_ms=(slo.metric, slo.threshold_ms) if slo else None,
        tolerances=dict(scenario.expect.tolerances),
        meta=meta,
    )
