"""Sweeps: a grid over any scenario keys, each point planned in its own process.

``parse_sweep("arms.batched.client.batch.max_items=5,10,20")`` reads one flag; values are
YAML scalars. ``sweep_points`` applies every grid point with ``with_overrides`` before any
run, so a key that does not exist or a value of the wrong type is refused naming the key.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import yaml

from loadtests.planner.sim import PlanOptions, plan_scenario
from loadtests.scenario import Scenario, ScenarioError, load_scenario, with_overrides
from reports.report import fmt_hours, fmt_usd
from reports.summary import find_knee

__all__ = ["SweepError", "parse_sweep", "run_sweep", "sweep_points", "sweep_table",
           "sweep_text"]

SWEEP_HEADERS = ("point", "arm", "items/min", "429s", "binds", "projected time",
                 "cost per item")


class SweepError(ValueError):
    """A sweep flag or point that cannot be planned; the message names the key."""


def parse_sweep(text: str) -> tuple[str, tuple[Any, ...]]:
    """``KEY=V1,V2,...`` -> (key, values) with each value read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise SweepError(f"--sweep {text!r}: expected KEY=V1,V2,...")
    values = []
    for part in raw.split(","):
        try:
            values.append(yaml.safe_load(part.strip()))
        except yaml.YAMLError as exc:
            raise SweepError(f"--sweep {key}: value {part!r} is not a YAML scalar") from exc
    return key, tuple(values)


@dataclass(frozen=True, slots=True)
class Point:
    """One grid point: the overrides and the checked scenario they give."""

    overrides: Mapping[str, Any]
    scenario: Scenario

    @property
    def label(self) -> str:
        """``key=value`` pairs, the last key segment only."""
        return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.overrides.items())


def sweep_points(scenario: Scenario,
                 sweeps: Sequence[tuple[str, Sequence[Any]]]) -> list[Point]:
    """Every grid point, checked before anything runs (SweepError names the key)."""
    keys = [k for k, _ in sweeps]
    points = []
    for combo in itertools.product(*(v for _, v in sweeps)):
        overrides = dict(zip(keys, combo, strict=True))
        try:
            points.append(Point(overrides, with_overrides(scenario, overrides)))
        except ScenarioError as exc:
            named = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            raise SweepError(f"sweep point {named} refused:\n{exc}") from exc
    return points


def _plan_point(args: tuple[str, Mapping[str, Any], int | None]) -> dict[str, Any]:
    path, overrides, items = args
    scenario = with_overrides(load_scenario(path), overrides)
    result = plan_scenario(scenario, PlanOptions(items=items))
    return result.summary()


def run_sweep(scenario: Scenario, points: Sequence[Point], *, items: int | None = None,
              processes: int | None = None) -> dict[str, Any]:
    """Plan every point (in ``processes`` worker processes; 1 = in this process) and return
    the sweep object: one row per point and arm, and the best point per arm."""
    jobs = [(str(scenario.path), dict(p.overrides), items) for p in points]
    if processes == 1 or len(jobs) == 1:
        summaries = [_plan_point(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            summaries = list(pool.map(_plan_point, jobs))
    rows = []
    for point, summary in zip(points, summaries, strict=True):
        for arm in summary["arms"]:
            if arm.get("lane") != "batch":
                continue
            rows.append({
                "point": point.label,
                "values": dict(point.overrides),
                "arm": arm["name"],
                # the rate the projected time is taken at (the steady rate where there is
                # one): the whole plan's rate counts its first minute's burst, and beside
                # that time it would say two things
                "items_per_min": (arm["projection"].get("items_per_min")
                                  or arm["throughput"]["items_per_min"]),
                "requests_per_min": arm["throughput"]["requests_per_min"],
                "http_429": arm["requests"]["http_429"],
                "error_rate": arm["requests"]["error_rate"] + arm["requests"]["rate_429"],
                "cost_per_item_usd": arm["cost_usd"]["per_item"],
                "duration_s": arm["projection"]["duration_s"],
                "binding": arm["bound"]["binding"],
                "efficiency": arm["bound"]["efficiency"],
            })
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["arm"] not in best or row["items_per_min"] > best[row["arm"]]["items_per_min"]:
            best[row["arm"]] = row
    out: dict[str, Any] = {"keys": [k for k in points[0].overrides] if points else [],
                           "rows": rows, "best": best}
    if len(out["keys"]) == 1:
        key = out["keys"][0]
        numeric = [r for r in rows if isinstance(r["values"][key], int | float)]
        arms = sorted({r["arm"] for r in numeric})
        if numeric and len(arms) >= 1:
            series = [r for r in numeric if r["arm"] == arms[0]]
            xs = [float(r["values"][key]) for r in series]
            ys = [r["items_per_min"] for r in series]
            errs = [r["error_rate"] for r in series]
            if len(xs) >= 2:
                knee = find_knee(xs, ys, errs)
                out["knee"] = {"arm": arms[0], "value": xs[knee], "items_per_min": ys[knee]}
    return out


def sweep_summary(base: Mapping[str, Any], sweep: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` summary with the sweep attached in the recorder's ``sweep`` shape (one key)
    so the report draws the curve with the knee marked, and the full grid under ``grid``."""
    out = dict(base)
    out["grid"] = sweep
    keys = sweep.get("keys", [])
    knee = sweep.get("knee")
    if len(keys) == 1 and knee is not None:
        points = [r for r in sweep["rows"] if r["arm"] == knee["arm"]]
        xs = [float(r["values"][keys[0]]) for r in points]
        out["sweep"] = {
            "key": keys[0],
            "points": [{"value": x, "arm": r["arm"], "items_per_min": r["items_per_min"],
                        "requests_per_min": r["requests_per_min"],
                        "error_rate": r["error_rate"], "latency_p95_ms": None}
                       for x, r in zip(xs, points, strict=True)],
            "knee": {"index": xs.index(knee["value"]), "value": knee["value"],
                     "arm": knee["arm"], "items_per_min": knee["items_per_min"]},
        }
    return out


def sweep_table(grid: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The sweep's rows as table cells under ``SWEEP_HEADERS``, each arm's best point
    marked ``**best**`` (the report's Markdown; ``sweep_text`` drops the stars)."""
    best = grid.get("best") or {}
    cells: list[tuple[str, ...]] = []
    for r in grid.get("rows") or []:
        mark = " **best**" if best.get(r["arm"], {}).get("point") == r["point"] else ""
        cells.append((f"{r['point']}{mark}", str(r["arm"]), f"{r['items_per_min']:,.0f}",
                      str(r["http_429"]), str(r["binding"]), fmt_hours(r["duration_s"]),
                      fmt_usd(r["cost_per_item_usd"])))
    return cells


def sweep_text(grid: Mapping[str, Any]) -> str:
    """The sweep as an aligned text table for the terminal, then each arm's best point."""
    rows: list[tuple[str, ...]] = [SWEEP_HEADERS]
    rows += [tuple(c.replace(" **best**", " (best)") for c in row) for row in sweep_table(grid)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(SWEEP_HEADERS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    for arm, row in (grid.get("best") or {}).items():
        lines.append(f"best for {arm}: {row['point']} ({row['items_per_min']:,.0f} items/min, "
                     f"{fmt_hours(row['duration_s'])} for the projected job, "
                     f"{fmt_usd(row['cost_per_item_usd'])} per item)")
    return "\n".join(lines)
