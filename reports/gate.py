"""``ratelab gate SUMMARY --baseline BASELINE``: hold a run's figures against a baseline.

Baseline file (JSON, schema ``ratelab.baseline/1``)::

    {"schema": "ratelab.baseline/1", "scenario": "ci-gate",
     "figures": {"batch.throughput.items_per_min":
                     {"value": 3480.0, "tolerance": 0.02, "direction": "higher"},
                 "batch.requests.rate_429": {"value": 0.0, "abs_tolerance": 0.01}}}

A figure regresses when it moves the wrong way by more than ``max(tolerance * |value|,
abs_tolerance)``; ``tolerance`` defaults to the summary's ``expect.tolerances`` entry, else
2%. The summary's own ``expect:`` checks are gated too. Exit 0 when all hold, 1 on any
regression, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from reports.summary import SummaryError, direction, figure, load_summary

HELP = "Compare a run's summary.json with a baseline; exit 1 on a regression, 2 on bad input."
BASELINE_SCHEMA = "ratelab.baseline/1"
DEFAULT_TOLERANCE = 0.02

# figures a new baseline gates for every batch arm, chosen to be set by the simulated limits:
# the steady rate (whole windows after the first, by dispatch time), not the whole job's,
# which the first window's head start, the job's tail and Locust's start-up move
DEFAULT_FIGURES: tuple[tuple[str, float, float], ...] = (
    ("throughput.steady_items_per_min", 0.03, 0.0),
    ("tokens.per_item", 0.02, 0.0),
    ("items.per_request", 0.02, 0.0),
    ("requests.rate_429", 0.0, 0.01),
)

FALLBACKS = {"throughput.steady_items_per_min": "throughput.items_per_min"}


class BaselineError(ValueError):
    """A baseline file that cannot be read or is malformed."""


@dataclass(frozen=True, slots=True)
class Row:
    """One gated figure: baseline, now, allowed change and verdict (ok, better, REGRESSION)."""

    figure: str
    baseline: str
    now: str
    tolerance: str
    verdict: str

    @property
    def failed(self) -> bool:
        """True when this row fails the gate."""
        return self.verdict in ("REGRESSION", "MISSING", "FAILED")


def load_baseline(path: str | Path) -> dict[str, Any]:
    """Read and check a baseline file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise BaselineError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    if not isinstance(data, dict) or data.get("schema") != BASELINE_SCHEMA:
        raise BaselineError(f"{path}: expected a JSON object with schema {BASELINE_SCHEMA!r}")
    figures = data.get("figures")
    if not isinstance(figures, dict) or not figures:
        raise BaselineError(f"{path}: figures: expected a non-empty object")
    for name, spec in figures.items():
        # JSON as Python reads it takes NaN and Infinity, and a NaN passes every comparison:
        # a gate on one could never fail
        if not isinstance(spec, dict) or not _finite(spec.get("value")):
            raise BaselineError(
                f'{path}: figures.{name}: expected {{"value": finite number, ...}}')
        for key in ("tolerance", "abs_tolerance"):
            if key in spec and not (_finite(spec[key]) and spec[key] >= 0):
                raise BaselineError(
                    f"{path}: figures.{name}.{key}: expected a finite number >= 0")
        if spec.get("direction", "higher") not in ("higher", "lower", "equal"):
            raise BaselineError(
                f"{path}: figures.{name}.direction: expected higher, lower or equal"
            )
    return data


def _finite(value: object) -> bool:
    """A JSON number (not a boolean) that is neither NaN nor infinite."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def gate_rows(summary: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[Row]:
    """Every gated figure and expect check of ``summary`` as a table row."""
    rows: list[Row] = []
    summary_tols = summary.get("expect", {}).get("tolerances", {}) or {}
    if summary.get("partial"):
        rows.append(Row("run.complete", "true", "false (partial)", "-", "FAILED"))
    for name, spec in baseline["figures"].items():
        base = float(spec["value"])
        rel = float(spec.get("tolerance", summary_tols.get(name, DEFAULT_TOLERANCE)))
        abs_tol = float(spec.get("abs_tolerance", 0.0))
        allowed = max(rel * abs(base), abs_tol)
        way = spec.get("direction", direction(name))
        tol_text = f"{rel:.0%}" if rel * abs(base) >= abs_tol else f"±{abs_tol:g}"
        now = figure(summary, name)
        if now is None or not math.isfinite(now):
            # not a number is no figure: it fails, as a missing one does
            rows.append(Row(name, _fmt(base), "missing" if now is None else _fmt(now),
                            tol_text, "MISSING"))
            continue
        worse = (
            (now < base - allowed)
            if way == "higher"
            else (now > base + allowed)
            if way == "lower"
            else abs(now - base) > allowed
        )
        better = (
            (now > base + allowed)
            if way == "higher"
            else (now < base - allowed)
            if way == "lower"
            else False
        )
        verdict = "REGRESSION" if worse else "better" if better else "ok"
        rows.append(Row(name, _fmt(base), _fmt(now), tol_text, verdict))
    for check in summary.get("checks", []) or []:
        rows.append(
            Row(
                f"expect {check['figure']}",
                f"{check['op']} {check['limit']:g}",
                _fmt(check["now"]),
                "-",
                "ok" if check["ok"] else "FAILED",
            )
        )
    return rows


def table(rows: Sequence[Row]) -> str:
    """A plain-text table of the rows."""
    headers = ("figure", "baseline", "now", "tolerance", "verdict")
    cells = [headers, *[(r.figure, r.baseline, r.now, r.tolerance, r.verdict) for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(headers))) for c in cells)


def markdown(rows: Sequence[Row], scenario: str) -> str:
    """A Markdown summary fit for a CI step summary."""
    failed = [r for r in rows if r.failed]
    head = f"### ratelab gate: {scenario}: " + (
        f"{len(failed)} regression(s)" if failed else "all figures hold"
    )
    lines = [head, "", "| figure | baseline | now | tolerance | verdict |", "|---|---|---|---|---|"]
    lines += [
        f"| {r.figure} | {r.baseline} | {r.now} | {r.tolerance} | "
        f"{'**' + r.verdict + '**' if r.failed else r.verdict} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def junit(rows: Sequence[Row], scenario: str) -> str:
    """JUnit XML: one test case per gated figure, a failure for each regression."""
    failures = sum(r.failed for r in rows)
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<testsuite name={quoteattr("ratelab.gate." + scenario)} tests="{len(rows)}" '
        f'failures="{failures}" errors="0">',
    ]
    for r in rows:
        out.append(
            f"  <testcase classname={quoteattr('ratelab.gate.' + scenario)} "
            f"name={quoteattr(r.figure)}>"
        )
        if r.failed:
            message = f"{r.figure}: baseline {r.baseline}, now {r.now}, tolerance {r.tolerance}"
            out.append(f"    <failure message={quoteattr(message)}>{escape(message)}</failure>")
        out.append("  </testcase>")
    out.append("</testsuite>")
    return "\n".join(out) + "\n"


def new_baseline(summary: Mapping[str, Any], old: Mapping[str, Any] | None) -> dict[str, Any]:
    """A baseline holding the summary's current figures (the old one's figures and tolerances)."""
    if old is not None:
        specs = {name: dict(spec) for name, spec in old["figures"].items()}
    else:
        specs = {}
        for arm in summary["arms"]:
            if not arm["items"]["total"]:
                continue
            for path, rel, abs_tol in DEFAULT_FIGURES:
                if figure(summary, f"{arm['name']}.{path}") is None and path in FALLBACKS:
                    # too short a job for a steady window: the whole job's rate instead
                    path = FALLBACKS[path]
                spec: dict[str, Any] = {"tolerance": rel, "direction": direction(f"x.{path}")}
                if abs_tol:
                    spec["abs_tolerance"] = abs_tol
                specs[f"{arm['name']}.{path}"] = spec
    figures: dict[str, Any] = {}
    for name, spec in specs.items():
        now = figure(summary, name)
        if now is None:
            raise SummaryError(f"figure {name!r} is missing from the summary")
        if not math.isfinite(now):
            raise SummaryError(f"figure {name!r} is {now:g} in the summary: no baseline")
        figures[name] = {**spec, "value": now}
    return {"schema": BASELINE_SCHEMA, "scenario": summary["scenario"], "figures": figures}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ratelab gate``."""
    parser.add_argument("summary", metavar="SUMMARY", help="summary.json (or its run folder)")
    parser.add_argument("--baseline", required=True, metavar="BASELINE", help="baseline JSON")
    parser.add_argument("--junit", metavar="FILE", help="also write JUnit XML here")
    parser.add_argument("--markdown", metavar="FILE", help="also write a Markdown summary here")
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="rewrite the baseline with this run's figures (on purpose)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the gate; 0 all hold, 1 a regression, 2 unusable input."""
    try:
        summary = load_summary(args.summary)
        baseline_path = Path(args.baseline)
        if args.update_baseline:
            if summary.get("partial") or summary.get("ok") is False:
                # a baseline from a broken run would make the next broken run pass
                why = "is partial" if summary.get("partial") else "failed its expect: checks"
                raise BaselineError(f"{args.summary}: the run {why}; a baseline is taken only "
                                    "from a run that passed: fix the run, then update")
            old = load_baseline(baseline_path) if baseline_path.exists() else None
            fresh = new_baseline(summary, old)
            baseline_path.parent.mkdir(parents=True, exist_ok=True)
            baseline_path.write_text(json.dumps(fresh, indent=2) + "\n", encoding="utf-8")
            print(
                f"ratelab gate: baseline {baseline_path} updated ({len(fresh['figures'])} figures)"
            )
            return 0
        baseline = load_baseline(baseline_path)
        if baseline.get("scenario", summary["scenario"]) != summary["scenario"]:
            # another scenario's figures would all read as missing: regressions that are not
            raise BaselineError(
                f"{baseline_path}: a baseline of scenario {baseline['scenario']!r}, and "
                f"{args.summary} a run of {summary['scenario']!r}")
    except (SummaryError, BaselineError) as exc:
        print(f"ratelab gate: {exc}", file=sys.stderr)
        return 2
    rows = gate_rows(summary, baseline)
    scenario = str(summary["scenario"])
    print(table(rows))
    if args.junit:
        Path(args.junit).write_text(junit(rows, scenario), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, scenario), encoding="utf-8")
    failed = [r for r in rows if r.failed]
    # a plain closing line that CI systems read as a test count
    closing = f"gate: {len(rows) - len(failed)} passed, {len(failed)} failed"
    if failed:
        print(closing)
        print(
            f"ratelab gate: {len(failed)} regression(s): "
            + ", ".join(
                f"{r.figure} ({r.now} vs {r.baseline}, tolerance {r.tolerance})" for r in failed
            ),
            file=sys.stderr,
        )
        return 1
    print("ratelab gate: ok")
    print(closing)
    return 0
