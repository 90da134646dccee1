"""Pure gateway figures: window counts, the admit_user replay, refusals by tier, queue depth
per lane, time to result of polling and subscribing callers."""

from __future__ import annotations

from gateway.config import TierLimits, default_config
from loadtests.gateway_figures import (
    Admitted,
    depth_rows,
    depth_series,
    limit_checks,
    percentiles,
    refusals_by_tier,
    replay_violations,
    results_by_mode,
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


def test_depth_series_per_lane_and_as_rows() -> None:
    samples = [(0.0, {"interactive": 0, "batch": 4, "background": 1, "shared": 0}),
               (2.5, {"interactive": 3, "batch": 0, "background": 2, "shared": 0}),
               (5.0, {"interactive": 1, "batch": 6, "background": 0, "shared": 0})]
    series = depth_series(samples)
    assert series["lanes"] == {"interactive": [0, 3, 1], "background": [5, 2, 6]}
    assert series["lane_stats"] == {"interactive": {"max": 3, "mean": 1.333},
                                    "background": {"max": 6, "mean": 4.333}}
    assert series["max"] == {"background": 2, "batch": 6, "interactive": 3, "shared": 0}
    rows = depth_rows(series)
    assert rows[1] == {"t_s": 2.5, "lane_interactive": 3, "lane_background": 2,
                       "queue_background": 2, "queue_batch": 0, "queue_interactive": 3,
                       "queue_shared": 0}
    # without lanes every chat task waits in "shared": it becomes a lane of its own
    flat = depth_series([(0.0, {"shared": 7, "batch": 1})])
    assert flat["lanes"] == {"interactive": [0], "background": [1], "shared": [7]}


def test_results_by_mode_separates_pollers_from_subscribers() -> None:
    admitted = [Admitted(f"t{i}", f"u{i}", "free", "interactive", 10, 100.0, 101.0, "done")
                for i in range(4)]
    lines = [{"id": "t0", "user": "u0", "results": "poll", "t_send": 0.0, "t_final": 2.5},
             {"id": "t1", "user": "u1", "results": "poll", "t_send": 0.0, "t_final": 3.0},
             {"id": "t2", "user": "u2", "results": "subscribe", "t_send": 0.0,
              "t_final": 1.1},
             {"id": "t3", "user": "u2", "results": "subscribe", "t_send": 0.0,
              "t_final": 2.0, "fallback": "poll"},
             {"id": "t9", "user": "u3", "results": "poll", "t_send": 0.0},   # never final
             {"user": "job", "t_send": 0.0, "t_final": 9.0}]                 # not a caller
    out = results_by_mode(lines, admitted)
    assert set(out) == {"poll", "subscribe"}
    assert (out["poll"]["users"], out["poll"]["tasks"], out["poll"]["fallbacks"]) == (2, 2, 0)
    assert (out["subscribe"]["users"], out["subscribe"]["tasks"],
            out["subscribe"]["fallbacks"]) == (1, 2, 1)
    assert out["poll"]["client_s"]["max"] == 3.0
    assert out["poll"]["gateway_s"]["p50"] == 1.0
    assert out["poll"]["notice_s"]["p50"] == 1.5 and out["poll"]["notice_s"]["max"] == 2.0
    assert out["subscribe"]["notice_s"]["p50"] == 0.1
