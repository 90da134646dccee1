"""The live SLO search of ``ratelab run``: short probes, doubling then bisecting.

Each probe runs the scenario with the searched group's stages replaced by one stage at the
probed user count (or arrival rate) for ``step_duration_s`` virtual seconds, into its own
folder ``probes/NN-VALUE/``. Its chosen percentile of TTFT, latency or time per output token
counts every failed request as infinitely slow, so a probe that fails requests cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loadtests.recorder import Event
from loadtests.run_plans import failing_percentile_ms, probe_overrides
from loadtests.rundir import read_run
from loadtests.scenario_model import Scenario
from loadtests.slo import SloSearcher

# virtual seconds between probes on the merged time axis of the run's summary
PROBE_GAP_S = 10.0

Probe = Callable[[Path, Mapping[str, Any]], str | None]


def probe_figures(events: list[Event], arm: str, metric: str, percentile: float,
                  threshold_ms: float, duration_s: float) -> dict[str, Any]:
    """One probe's figures for ``arm``: requests, failures, the percentile (ms), goodput."""
    mine = [e for e in events if e.kind == "request" and e.arm == arm]
    ok = [e for e in mine if e.outcome == "ok"]
    if metric == "ttft":
        values = [e.ttft_s for e in ok if e.ttft_s is not None]
        missing = len(ok) - len(values)  # an unstreamed reply has no TTFT: it cannot pass
    elif metric == "tpot":
        values = [(e.latency_s - (e.ttft_s or 0.0)) / (e.tokens_out - 1)
                  for e in ok if e.ttft_s is not None and e.tokens_out > 1]
        missing = 0
    else:
        values = [e.latency_s for e in ok]
        missing = 0
    failed = len(mine) - len(ok)
    measured = failing_percentile_ms(values, failed + missing, percentile)
    good = sum(1 for v in values if v * 1000.0 <= threshold_ms)
    # the probe's real span: Locust's shape stops it up to a wall second after the stage
    span = (max(e.t for e in mine) - min(e.t - e.latency_s for e in mine)) if mine else 0.0
    span = max(span, duration_s)
    return {
        "requests": len(mine),
        "failed": failed,
        "measured_ms": measured,
        "good": good,
        "duration_s": span,
        "goodput_per_s": good / span if span > 0 else 0.0,
    }


def search(scenario: Scenario, run_dir: Path, probe: Probe,
           parts: list[tuple[Path, float]]) -> dict[str, Any]:
    """Probe until the search ends; append each probe's folder and time offset to ``parts``
    and return the summary's ``slo_search`` object."""
    slo = scenario.load.slo_search
    if slo is None:
        raise ValueError("the scenario has no load.slo_search")
    group = next(g for g in scenario.load.users if g.name == slo.users)
    integer = slo.variable == "users" and group.mode == "closed"
    searcher = SloSearcher(start=slo.start, max=slo.max, threshold_ms=slo.threshold_ms,
                           tolerance=slo.tolerance, integer=integer)
    rows: list[dict[str, Any]] = []
    offset = 0.0
    index = 0
    while (value := searcher.next_value()) is not None:
        folder = run_dir / "probes" / f"{index:02d}-{value:g}"
        stopped = probe(folder, probe_overrides(scenario, value, index))
        parts.append((folder, offset))
        offset += slo.step_duration_s + PROBE_GAP_S
        events, _ = read_run(folder)
        row = {"value": value, "stage": f"probe-{index}", "stopped": stopped,
               **probe_figures(events, group.arm, slo.metric, slo.percentile, slo.threshold_ms,
                               slo.step_duration_s)}
        searcher.observe(row["measured_ms"] if stopped is None else None)
        row["ok"] = searcher.probes[-1].ok
        rows.append(row)
        index += 1
    best = searcher.best
    best_row = next((r for r in reversed(rows) if r["ok"] and r["value"] == best), None)
    return {
        "group": slo.users,
        "arm": group.arm,
        "variable": "users" if integer else "rate_per_s",
        "metric": slo.metric,
        "percentile": slo.percentile,
        "threshold_ms": slo.threshold_ms,
        "step_duration_s": slo.step_duration_s,
        "probes": rows,
        "best": best,
        "goodput_per_s": None if best_row is None else best_row["goodput_per_s"],
    }
