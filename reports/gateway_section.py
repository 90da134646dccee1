"""The report's gateway section: enqueue latency, time to result per lane and per result
mode (polling or subscribing callers), queue depth over time per lane (a plot), refusals by
tier and the per-user limit verdict, from summary.json's ``gateway`` object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reports.plots import _finish, plt  # plt with the Agg backend the plots module set

Block = tuple[Any, ...]
MODE_WORDS = {"poll": "polling", "subscribe": "subscribing (SSE)"}


def _f(value: Any, digits: int = 2) -> str:
    return "--" if value is None else f"{float(value):,.{digits}f}"


def gateway_blocks(summary: Mapping[str, Any]) -> list[Block]:
    """Report blocks (``h2``, ``p``, ``table``) for a run with a gateway; none without."""
    gw = summary.get("gateway")
    if not gw:
        return []
    tasks, limits, prov = gw["tasks"], gw["limits"], gw["provider"]
    verdict = ("no user exceeded their tier's limit" if limits["users_over_limit"] == 0
               else f"**{limits['users_over_limit']} users exceeded their tier's limit**")
    inter = gw["time_to_result_s"].get("interactive", {})
    lead = (
        f"{gw['processes']} gateway process(es), state in {gw['backend']}: "
        f"{tasks['submitted']:,} tasks submitted, {tasks['accepted']:,} accepted, "
        f"{'all' if tasks['all_done'] else 'NOT all'} done; {verdict} "
        f"({limits['users_checked']:,} users checked by 60 s window counts and by replaying "
        f"gateway.limits). Interactive p95 time to result {_f(inter.get('p95'))} s against a "
        f"budget of {_f(gw['interactive_p95_budget_s'])} s "
        f"({'within' if gw['interactive_p95_within_budget'] else 'OVER'}). The provider "
        f"answered {prov['http_429']} 429s to the shared key (limit {prov['rpm_limit']} RPM; "
        f"busiest sampled 60 s: {prov['busiest_60s_requests']} requests)."
    )
    enq = gw["enqueue_latency_ms"]
    lanes = [(lane, "gateway", _f(v["p50"]), _f(v["p95"]), _f(v["p99"]), str(v["count"]))
             for lane, v in gw["time_to_result_s"].items()]
    lanes += [(lane, "client", _f(v["p50"]), _f(v["p95"]), _f(v["p99"]),
               str(v["count"])) for lane, v in gw["client_time_to_result_s"].items()]
    modes = [(MODE_WORDS.get(mode, mode), str(r["users"]), str(r["tasks"]),
              _f(r["client_s"]["p50"]), _f(r["client_s"]["p95"]), _f(r["client_s"]["p99"]),
              _f(r["gateway_s"]["p50"]), _f(r["gateway_s"]["p95"]),
              _f(r["notice_s"]["p50"]), _f(r["notice_s"]["p95"]), str(r["fallbacks"]))
             for mode, r in gw.get("results_by_mode", {}).items()]
    tiers = [(tier, str(r["users"]), str(r["users_refused"]), str(r["accepted"]),
              str(r["refused"]), f"{100 * r['refusal_rate']:.1f}%",
              str(limits["max_per_60s_by_tier"].get(tier, {}).get("max_per_60s", "--")),
              _f(limits["max_per_60s_by_tier"].get(tier, {}).get("allowed_per_60s"), 0))
             for tier, r in gw["refusals_by_tier"].items()]
    depth = gw["queue_depth"]
    stats = depth.get("lane_stats") or {q: {"max": n, "mean": None}
                                        for q, n in depth.get("max", {}).items()}
    return [
        ("h2", "Gateway"),
        ("p", lead),
        ("table", ("enqueue latency (wall ms)", "p50", "p90", "p95", "p99", "max"),
         [("POST /v1/tasks", _f(enq["p50"]), _f(enq["p90"]), _f(enq["p95"]), _f(enq["p99"]),
           _f(enq["max"]))]),
        ("table", ("lane", "time to result (virtual s)", "p50", "p95", "p99", "tasks"), lanes),
        *([("table", ("callers", "users", "tasks", "caller p50 (virtual s)", "caller p95",
                      "caller p99", "gateway p50", "gateway p95", "noticed after p50",
                      "noticed after p95", "fell back to polling"), modes)] if modes else []),
        ("table", ("tier", "users", "users refused", "accepted", "refused", "refusal rate",
                   "most in 60 s", "allowed in 60 s"), tiers),
        ("table", ("lane", "tasks waiting: max", "mean (over time: plot)"),
         [(lane, str(st["max"]), _f(st["mean"])) for lane, st in stats.items()]),
    ]


def queue_depth_plot(summary: Mapping[str, Any]) -> bytes | None:
    """Tasks waiting per lane over virtual time (the gateway's sampled queue depths)."""
    depth = (summary.get("gateway") or {}).get("queue_depth") or {}
    lanes = depth.get("lanes") or {}
    if not depth.get("t_s") or not lanes:
        return None
    minutes = [float(t) / 60 for t in depth["t_s"]]
    fig, ax = plt.subplots(figsize=(8, 3.0))
    for i, (lane, values) in enumerate(lanes.items()):
        ax.plot(minutes, values, color=f"C{i % 10}", label=f"{lane} lane")
    return _finish(fig, ax, "tasks waiting", "Gateway queue depth over time")


def gateway_plots(summary: Mapping[str, Any]) -> list[tuple[str, str, bytes]]:
    """The gateway's plots as (key, title, PNG bytes), for the report's plots section."""
    png = queue_depth_plot(summary)
    return [("gateway-queue-depth", "Gateway queue depth over time", png)] if png else []
