"""Pure gateway figures: window counts, the admit_user replay, refusals by tier."""

from __future__ import annotations

from gateway.config import TierLimits, default_config
from loadtests.gateway_figures import (
    Admitted,
    limit_checks,
    percentiles,
    refusals_by_tier,
    replay_violations,
    window_allowance,
    window_max,
)

FREE = TierLimits(rpm=10, tokens_per_day=100_000, burst=2)


def _task(task_id: str, at: float, user: str = "u1", tokens: int = 100) -> Admitted:
    return Admitted(task_id, user, "free", "interactive", tokens, at, at + 1.0, "done")


def test_window_max_counts_half_open_windows() -> None:
    assert window_max([0.0, 1.0, 59.9, 60.0, 61.0], 60.0) == 3
    assert window_max([], 60.0) == 0


def test_window_allowance_is_burst_plus_a_minute_of_refill() -> None:
    assert window_allowance(FREE) == 12.0
    assert window_allowance(TierLimits(rpm=None)) == float("inf")


def test_replay_accepts_a_paced_user_and_names_the_task_over_the_burst() -> None:
    paced = [_task(f"t{i}", i * 6.0) for i in range(10)]
    assert replay_violations(paced, FREE) == []
    burst = [_task("a", 0.0), _task("b", 0.5), _task("c", 0.6)]
    assert replay_violations(burst, FREE) == ["c"]


def test_limit_checks_report_the_user_over_the_limit() -> None:
    cfg = default_config(tiers={"free": FREE}, default_tier="free")
    tasks = [_task("a", 0.0), _task("b", 0.5), _task("c", 0.6), _task("d", 0.0, user="u2")]
    checks = limit_checks(tasks, cfg)
    assert checks["users_checked"] == 2
    assert checks["users_over_limit"] == 1
    assert checks["replay_refusals"] == 1
    assert checks["over"]["u1"]["replay_refused"] == ["c"]
    assert checks["max_per_60s_by_tier"] == {"free": {"max_per_60s": 3, "allowed_per_60s": 12.0}}


def test_refusals_by_tier_counts_users_and_limits() -> None:
    cfg = default_config(users={"p": "pro"})
    lines = [{"user": "f", "status": 202}, {"user": "f", "status": 429,
                                             "limit": "requests_per_minute"},
             {"user": "p", "status": 202}, {"user": "job", "status": 202}]
    out = refusals_by_tier(lines, cfg, ["job"])
    assert out["free"] == {"users": 1, "users_refused": 1, "accepted": 1, "refused": 1,
                           "by_limit": {"requests_per_minute": 1}, "refusal_rate": 0.5}
    assert out["pro"]["accepted"] == 1 and out["pro"]["refused"] == 0


def test_percentiles_nearest_rank() -> None:
    assert percentiles([1.0, 2.0, 3.0, 4.0]) == {"count": 4, "p50": 2.0, "p90": 4.0,
                                                 "p95": 4.0, "p99": 4.0, "max": 4.0}
