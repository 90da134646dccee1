"""The ``gateway`` figures of summary.json, from the users' task lines and the gateway's records.

Pure: the callers' lines (``gateway-*.jsonl``: who sent what, 202 or 429, enqueue wall ms),
the gateway's own task records (``created`` is the virtual instant the user's buckets were
charged, ``updated`` the instant the task became final), queue-depth samples and the
provider's counters go in; a JSON-ready dict comes out. Whether a user exceeded their tier is
checked twice: the 202s in every 60 s window against what a token bucket can admit
(``burst + rpm``), and a replay of every admitted task through ``gateway.limits.admit_user``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gateway.config import GatewayConfig, TierLimits
from gateway.limits import DAY_S, WINDOW_S, admit_user, full_buckets

# float slack of the replay: Lua and Python round differently in the last bits
REPLAY_SLACK = 1e-6
SHOWN_VIOLATIONS = 10
# The gateway's queues behind each lane: item tasks wait in "batch", other background tasks
# in "background"; "shared" is the one FIFO of a gateway with lanes switched off.
LANE_QUEUES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("interactive", ("interactive",)), ("background", ("batch", "background")),
    ("shared", ("shared",)))


@dataclass(frozen=True, slots=True)
class Admitted:
    """One accepted task as the gateway stored it (virtual seconds, ratelab tokens)."""

    id: str
    user: str
    tier: str
    lane: str
    tokens: int
    created: float
    updated: float
    state: str


def percentiles(values: Sequence[float], digits: int = 3) -> dict[str, float | int | None]:
    """count, p50, p90, p95, p99 and max of ``values`` (nearest rank; None when empty)."""
    ordered = sorted(values)
    out: dict[str, float | int | None] = {"count": len(ordered)}
    for name, q in (("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p99", 0.99)):
        if not ordered:
            out[name] = None
            continue
        rank = max(1, math.ceil(q * len(ordered)))
        out[name] = round(ordered[rank - 1], digits)
    out["max"] = round(ordered[-1], digits) if ordered else None
    return out


def window_max(times: Sequence[float], window_s: float) -> int:
    """The most events in any half-open window ``[t, t + window_s)`` (times need not be sorted)."""
    ordered = sorted(times)
    best = lo = 0
    for hi, t in enumerate(ordered):
        while ordered[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def window_allowance(tier: TierLimits) -> float:
    """Most requests a token bucket of ``tier`` admits in any 60 s window (inf: no limit)."""
    if tier.rpm is None:
        return math.inf
    return (tier.capacity or 0.0) + tier.rpm * WINDOW_S / 60.0


def replay_violations(tasks: Sequence[Admitted], tier: TierLimits) -> list[str]:
    """Ids of ``tasks`` (one user's admitted tasks) that ``admit_user`` would have refused."""
    cap = tier.capacity
    slack = replace(tier, burst=cap + REPLAY_SLACK if cap is not None else None)
    ordered = sorted(tasks, key=lambda a: a.created)
    if not ordered:
        return []
    state = full_buckets(tier, ordered[0].created)
    if tier.tokens_per_day is not None:
        state.tokens += REPLAY_SLACK
    bad = []
    for task in ordered:
        if not admit_user(state, slack, task.created, task.tokens).allowed:
            bad.append(task.id)
    return bad


def limit_checks(admitted: Sequence[Admitted], config: GatewayConfig) -> dict[str, Any]:
    """Both checks over every user: window counts and the ``admit_user`` replay."""
    by_user: dict[str, list[Admitted]] = defaultdict(list)
    for task in admitted:
        by_user[task.user].append(task)
    over: dict[str, dict[str, Any]] = {}
    replay_bad = 0
    for user, tasks in sorted(by_user.items()):
        tier_name = config.tier_of(user)
        tier = config.tiers[tier_name]
        most = window_max([t.created for t in tasks], WINDOW_S)
        allowed = window_allowance(tier)
        span = max(t.created for t in tasks) - min(t.created for t in tasks)
        tokens = sum(t.tokens for t in tasks)
        token_allowance = (math.inf if tier.tokens_per_day is None
                           else tier.tokens_per_day * (1 + span / DAY_S))
        bad = replay_violations(tasks, tier)
        replay_bad += len(bad)
        if most > allowed + 1e-9 or tokens > token_allowance + 1e-6 or bad:
            over[user] = {"tier": tier_name, "max_per_60s": most,
                          "allowed_per_60s": None if math.isinf(allowed) else allowed,
                          "tokens": tokens, "replay_refused": bad[:SHOWN_VIOLATIONS]}
    return {
        "users_checked": len(by_user),
        "users_over_limit": len(over),
        "replay_refusals": replay_bad,
        "over": dict(list(over.items())[:SHOWN_VIOLATIONS]),
        "max_per_60s_by_tier": _max_by_tier(by_user, config),
    }


def _max_by_tier(by_user: Mapping[str, list[Admitted]], config: GatewayConfig
                 ) -> dict[str, dict[str, float | int | None]]:
    out: dict[str, dict[str, float | int | None]] = {}
    for user, tasks in by_user.items():
        name = config.tier_of(user)
        allowed = window_allowance(config.tiers[name])
        row = out.setdefault(name, {"max_per_60s": 0,
                                    "allowed_per_60s": None if math.isinf(allowed) else allowed})
        row["max_per_60s"] = max(int(row["max_per_60s"] or 0),
                                 window_max([t.created for t in tasks], WINDOW_S))
    return dict(sorted(out.items()))


def refusals_by_tier(lines: Sequence[Mapping[str, Any]], config: GatewayConfig,
                     skip_users: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Per tier: users seen, users refused at least once, accepted and refused tasks, and the
    refusals by limit, from the callers' task lines."""
    out: dict[str, dict[str, Any]] = {}
    users: dict[str, set[str]] = defaultdict(set)
    refused_users: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        user = str(line["user"])
        if user in skip_users:
            continue
        tier = config.tier_of(user)
        row = out.setdefault(tier, {"users": 0, "users_refused": 0, "accepted": 0,
                                    "refused": 0, "by_limit": {}})
        users[tier].add(user)
        if line["status"] == 202:
            row["accepted"] += 1
        elif line["status"] == 429:
            row["refused"] += 1
            refused_users[tier].add(user)
            limit = str(line.get("limit"))
            row["by_limit"][limit] = row["by_limit"].get(limit, 0) + 1
    for tier, row in out.items():
        row["users"] = len(users[tier])
        row["users_refused"] = len(refused_users[tier])
        sent = row["accepted"] + row["refused"]
        row["refusal_rate"] = round(row["refused"] / sent, 4) if sent else 0.0
    return dict(sorted(out.items()))


def depth_series(samples: Sequence[tuple[float, Mapping[str, int]]]) -> dict[str, Any]:
    """Queue depth over virtual time: ``t_s`` and one list per queue, plus each maximum;
    ``lanes`` the tasks waiting per lane (``LANE_QUEUES``; ``shared`` only when it ever
    held one) with their maximum and mean in ``lane_stats``."""
    queues = sorted({q for _, depths in samples for q in depths})
    series: dict[str, Any] = {"t_s": [round(t, 3) for t, _ in samples]}
    for q in queues:
        series[q] = [int(depths.get(q, 0)) for _, depths in samples]
    series["max"] = {q: max(series[q], default=0) for q in queues}
    lanes: dict[str, list[int]] = {}
    for lane, names in LANE_QUEUES:
        values = [sum(int(depths.get(q, 0)) for q in names) for _, depths in samples]
        if lane != "shared" or any(values):
            lanes[lane] = values
    series["lanes"] = lanes
    series["lane_stats"] = {lane: {"max": max(v, default=0),
                                   "mean": round(sum(v) / len(v), 3) if v else 0.0}
                            for lane, v in lanes.items()}
    return series


def depth_rows(series: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The depth series as time-series rows: ``t_s``, ``lane_<lane>`` and ``queue_<queue>``
    per sample (``gateway_timeseries.csv``)."""
    queues = sorted(series.get("max", {}))
    rows = []
    for i, t in enumerate(series.get("t_s", [])):
        row: dict[str, Any] = {"t_s": t}
        for lane, values in series.get("lanes", {}).items():
            row[f"lane_{lane}"] = values[i]
        for q in queues:
            row[f"queue_{q}"] = series[q][i]
        rows.append(row)
    return rows


def results_by_mode(lines: Sequence[Mapping[str, Any]], admitted: Sequence[Admitted]
                    ) -> dict[str, dict[str, Any]]:
    """Per result mode of the callers (``poll``, ``subscribe``): users and tasks, the time
    to result the caller saw (``client_s``: send to seeing the final state, virtual s), the
    gateway's own (``gateway_s``: accepted to final) and the difference (``notice_s``: how
    long after the gateway had the result the caller had it, plus the enqueue round trip);
    ``fallbacks`` counts subscriptions that broke and were finished by polling."""
    found = {a.id: a for a in admitted}
    rows: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    users: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        mode = line.get("results")
        if mode is None or line.get("t_final") is None:
            continue
        row = rows.setdefault(str(mode), {"users": 0, "tasks": 0, "fallbacks": 0})
        users[str(mode)].add(str(line["user"]))
        row["tasks"] += 1
        row["fallbacks"] += 1 if line.get("fallback") else 0
        client = float(line["t_final"]) - float(line["t_send"])
        values[str(mode)]["client"].append(client)
        task = found.get(str(line.get("id")))
        if task is not None and task.state == "done":
            gateway = task.updated - task.created
            values[str(mode)]["gateway"].append(gateway)
            values[str(mode)]["notice"].append(client - gateway)
    for mode, row in rows.items():
        row["users"] = len(users[mode])
        row["client_s"] = percentiles(values[mode]["client"])
        row["gateway_s"] = percentiles(values[mode]["gateway"])
        row["notice_s"] = percentiles(values[mode]["notice"])
    return dict(sorted(rows.items()))


def gateway_figures(lines: Sequence[Mapping[str, Any]], admitted: Sequence[Admitted],
                    config: GatewayConfig, *, depths: Sequence[tuple[float, Mapping[str, int]]],
                    provider: Mapping[str, Any], backend: str, processes: int,
                    job_user: str | None) -> dict[str, Any]:
    """The ``gateway`` object of summary.json (see docs/summary.md's gateway section)."""
    accepted_ids = {str(line["id"]) for line in lines if line["status"] == 202 and line.get("id")}
    found = {a.id: a for a in admitted}
    states: dict[str, int] = defaultdict(int)
    for task_id in accepted_ids:
        states[found[task_id].state if task_id in found else "lost"] += 1
    ttr: dict[str, list[float]] = defaultdict(list)
    for a in admitted:
        if a.state == "done":
            ttr[a.lane].append(a.updated - a.created)
    client_ttr: dict[str, list[float]] = defaultdict(list)
    for line in lines:
        if line.get("t_final") is not None:
            client_ttr[str(line["lane"])].append(float(line["t_final"]) - float(line["t_send"]))
    budget = config.lanes.interactive_p95_budget_s
    interactive = percentiles(ttr.get("interactive", []))
    p95 = interactive["p95"]
    statuses: dict[str, int] = defaultdict(int)
    for line in lines:
        statuses[str(line["status"])] += 1
    return {
        "backend": backend,
        "processes": processes,
        "upstream": {"name": config.upstream.name, "rpm": config.upstream.rpm,
                     "tpm": config.upstream.tpm},
        "tiers": {name: {"rpm": t.rpm, "burst": t.capacity, "tokens_per_day": t.tokens_per_day}
                  for name, t in config.tiers.items()},
        "tasks": {
            "submitted": len(lines),
            "by_status": dict(sorted(statuses.items())),
            "accepted": len(accepted_ids),
            "by_state": dict(sorted(states.items())),
            "all_done": states.get("done", 0) == len(accepted_ids),
        },
        "enqueue_latency_ms": percentiles([float(line["enqueue_ms"]) for line in lines]),
        "time_to_result_s": {lane: percentiles(v) for lane, v in sorted(ttr.items())},
        "client_time_to_result_s": {lane: percentiles(v)
                                    for lane, v in sorted(client_ttr.items())},
        "results_by_mode": results_by_mode(lines, admitted),
        "interactive_p95_budget_s": budget,
        "interactive_p95_within_budget": p95 is not None and p95 <= budget,
        "queue_depth": depth_series(depths),
        "refusals_by_tier": refusals_by_tier(lines, config, [job_user] if job_user else []),
        "limits": limit_checks(admitted, config),
        "provider": dict(provider),
    }
