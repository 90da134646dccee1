"""Capacity answers: what a batch job needs to meet its deadline, how many interactive users
a provider profile holds, and how many GPUs a self-hosted profile needs for a user count.

Each answer re-plans derived scenarios (``with_overrides``) on a sample of the job and
projects from the planned rate; durations are virtual seconds, money USD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from loadtests.planner.sim import PlanOptions, plan_scenario
from loadtests.scenario import Scenario, ScenarioError, with_overrides

__all__ = [
    "MIN_SPAN_S",
    "TIERS_TPM",
    "arm_figures",
    "deadline_answers",
    "gpus_needed",
    "users_held",
]

# a ladder of TPM tiers (OpenAI-like usage tiers) searched for "the smallest tier"
TIERS_TPM = (30_000, 200_000, 450_000, 800_000, 2_000_000, 4_000_000, 10_000_000, 30_000_000)
KEY_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16)
BATCH_SIZES = (1, 5, 10, 20, 30, 40, 60, 80)


# a projection from a sample shorter than a few limit windows counts the first window's
# burst (an empty window admits a full budget at once) as the steady rate
MIN_SPAN_S = 600.0


def arm_figures(scenario: Scenario, arm: str, items: int,
                 min_span_s: float = MIN_SPAN_S) -> dict[str, Any] | None:
    """The arm's summary entry planned on ``items`` items, grown (once) so the sample spans
    at least ``min_span_s`` virtual seconds."""
    for _ in range(2):
        summary = plan_scenario(scenario, PlanOptions(items=items)).summary()
        entry = next((dict(a) for a in summary["arms"] if a["name"] == arm), None)
        if entry is None:
            return None
        span = entry["duration_s"] or 0.0
        if span >= min_span_s or span <= 0 or items >= entry["projection"]["items"]:
            return entry
        items = min(entry["projection"]["items"], math.ceil(items * min_span_s / span * 1.05))
    return entry


def _first_meeting(scenario: Scenario, arm: str, key: str, values: Sequence[Any],
                   items: int, deadline_s: float, min_span_s: float) -> dict[str, Any] | None:
    for value in values:
        try:
            variant = with_overrides(scenario, {key: value})
        except ScenarioError:
            continue
        figures = arm_figures(variant, arm, items, min_span_s)
        if figures is None:
            continue
        duration = figures["projection"]["duration_s"]
        if duration is not None and duration <= deadline_s:
            return {"key": key, "value": value, "duration_s": duration,
                    "cost_usd": figures["projection"]["cost_usd"]}
    return None


def _keys_meeting(scenario: Scenario, arm: str, items: int, deadline_s: float,
                  min_span_s: float) -> dict[str, Any] | None:
    """The fewest keys meeting the deadline with one client per key and the job split evenly.

    The batching client fails over between the keys of a provider but does not spread one
    job over them, so N keys are N independent clients (each its own limit window): the
    one-key plan of 1/N of the job, which is the one-key rate over N times fewer items.
    """
    figures = arm_figures(scenario, arm, items, min_span_s)
    if figures is None or not figures["projection"]["duration_s"]:
        return None
    one_key = figures["projection"]["duration_s"]
    for keys in KEY_COUNTS:
        if one_key / keys <= deadline_s:
            return {"key": f"arms.{arm}.keys", "value": keys, "duration_s": one_key / keys,
                    "cost_usd": figures["projection"]["cost_usd"],
                    "how": "one client per key, the job split evenly"}
    return None


def deadline_answers(scenario: Scenario, summary: dict[str, Any], sample_items: int = 2000,
                     min_span_s: float = MIN_SPAN_S) -> dict[str, Any]:
    """Per batch arm: the smallest key count, TPM tier and batch size whose projected
    duration meets the workload's ``project_deadline_s`` (None where none in range does).
    Each candidate is planned on a sample spanning at least ``min_span_s`` virtual seconds."""
    deadline = scenario.workload.project_deadline_s
    out: dict[str, Any] = {}
    provider = scenario.providers[0].name
    tpm_now = (scenario.provider(provider).data.get("limits") or {}).get("tpm")
    for arm in summary["arms"]:
        if arm.get("lane") != "batch":
            continue
        name = arm["name"]
        answers: dict[str, Any] = {"deadline_s": deadline,
                                   "meets_now": arm["projection"]["meets_deadline"]}
        answers["keys"] = _keys_meeting(scenario, name, sample_items, deadline, min_span_s)
        tiers = [t for t in TIERS_TPM if tpm_now is None or t >= tpm_now]
        answers["tier_tpm"] = _first_meeting(
            scenario, name, f"providers.{provider}.limits.tpm", tiers, sample_items, deadline,
            min_span_s)
        if arm["strategy"] == "semantic_batch":
            answers["batch_size"] = _first_meeting(
                scenario, name, f"arms.{name}.client.batch.max_items", BATCH_SIZES,
                sample_items, deadline, min_span_s)
        out[name] = answers
    return out


def _users_scenario(scenario: Scenario, group: str, users: int, duration_s: float) -> Scenario:
    raw = scenario.raw
    groups = []
    for g in raw["load"]["users"]:
        g = {k: v for k, v in g.items() if k not in ("stages", "step", "users", "rate_per_s")}
        if g["name"] == group:
            g["mode"] = "closed"
            g["stages"] = [{"name": f"u{users}", "duration_s": duration_s, "users": users}]
            groups.append(g)
    return with_overrides(scenario, {"load": {"users": groups}})


def users_held(scenario: Scenario, group: str, *, max_p95_ms: float, max_429_rate: float,
               duration_s: float = 300.0, limit: int = 4096) -> dict[str, Any]:
    """The most closed-loop users of ``group`` whose p95 latency and 429 rate stay under the
    thresholds (doubling, then bisecting); with the figures at that count."""
    arm = next(g.arm for g in scenario.load.users if g.name == group)

    def holds(users: int) -> tuple[bool, dict[str, Any]]:
        variant = _users_scenario(scenario, group, users, duration_s)
        summary = plan_scenario(variant).summary()
        entry = next(a for a in summary["arms"] if a["name"] == arm)
        p95 = entry["latency_ms"]["p95"]
        ok = (p95 is not None and p95 <= max_p95_ms
              and entry["requests"]["rate_429"] <= max_429_rate
              and entry["requests"]["error_rate"] <= max_429_rate)
        return ok, {"users": users, "p95_ms": p95, "rate_429": entry["requests"]["rate_429"],
                    "error_rate": entry["requests"]["error_rate"]}

    good, figures = holds(1)
    if not good:
        return {"users": 0, "figures": figures, "threshold_p95_ms": max_p95_ms,
                "threshold_429_rate": max_429_rate}
    lo, hi = 1, 2
    best = figures
    while hi <= limit:
        ok, fig = holds(hi)
        if not ok:
            break
        lo, best = hi, fig
        hi *= 2
    hi = min(hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, fig = holds(mid)
        if ok:
            lo, best = mid, fig
        else:
            hi = mid
    return {"users": lo, "figures": best, "threshold_p95_ms": max_p95_ms,
            "threshold_429_rate": max_429_rate}


def gpus_needed(users_per_gpu: int, target_users: int) -> int | None:
    """GPUs (one self-hosted provider each) to hold ``target_users`` simultaneous users."""
    if users_per_gpu <= 0:
        return None
    return math.ceil(target_users / users_per_gpu)
