"""The report's gateway section: enqueue latency, time to result per lane, queue depth,
refusals by tier and the per-user limit verdict, from summary.json's ``gateway`` object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Block = tuple[Any, ...]


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
    lanes += [(lane, "client (polled)", _f(v["p50"]), _f(v["p95"]), _f(v["p99"]),
               str(v["count"])) for lane, v in gw["client_time_to_result_s"].items()]
    tiers = [(tier, str(r["users"]), str(r["users_refused"]), str(r["accepted"]),
              str(r["refused"]), f"{100 * r['refusal_rate']:.1f}%",
              str(limits["max_per_60s_by_tier"].get(tier, {}).get("max_per_60s", "--")),
              _f(limits["max_per_60s_by_tier"].get(tier, {}).get("allowed_per_60s"), 0))
             for tier, r in gw["refusals_by_tier"].items()]
    depth = gw["queue_depth"]
    return [
        ("h2", "Gateway"),
        ("p", lead),
        ("table", ("enqueue latency (wall ms)", "p50", "p90", "p95", "p99", "max"),
         [("POST /v1/tasks", _f(enq["p50"]), _f(enq["p90"]), _f(enq["p95"]), _f(enq["p99"]),
           _f(enq["max"]))]),
        ("table", ("lane", "time to result (virtual s)", "p50", "p95", "p99", "tasks"), lanes),
        ("table", ("tier", "users", "users refused", "accepted", "refused", "refusal rate",
                   "most in 60 s", "allowed in 60 s"), tiers),
        ("table", ("queue", "max depth"),
         [(q, str(n)) for q, n in depth.get("max", {}).items()]),
    ]
