"""``ratelab plan``: run a scenario through the SimPy planner and write its run folder.

Exit statuses: 0 planned (and, with ``--compare``, every figure within ``--tolerance``),
1 a compared figure outside the tolerance, 2 unusable input (scenario, sweep, run folder).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

HELP = "Plan a scenario in virtual time (SimPy): projections, sweeps and capacity answers."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` subcommand's flags."""
    parser.add_argument("scenario", help="scenario YAML file")
    parser.add_argument("--items", type=int, default=None,
                        help="items in the batch job (default: the workload's)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="sweep a scenario key (dotted; arms/providers by name); repeat "
                             "for a grid")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes for sweep points (default: CPU count)")
    parser.add_argument("--out", default=None, help="run folder (default runs/<scenario>-plan-"
                                                    "<timestamp>); refused if it holds files")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --out: replace the run already in that folder")
    parser.add_argument("--compare", default=None, metavar="RUN_DIR",
                        help="a finished live run of this scenario: print predicted vs "
                             "measured per arm")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="relative error allowed by --compare (default 0.05)")
    parser.add_argument("--capacity", action="store_true",
                        help="also answer the capacity questions (deadline needs, users held, "
                             "GPUs, optimal batch size); takes several planning runs")
    parser.add_argument("--sample-items", type=int, default=2000,
                        help="items per planning run of the capacity searches (grown to span "
                             "--sample-span-s)")
    parser.add_argument("--sample-span-s", type=float, default=600.0,
                        help="virtual seconds a capacity sample spans at least, so limit "
                             "windows reach their steady state (default 600)")
    parser.add_argument("--target-users", type=int, default=None,
                        help="users a self-hosted GPU profile must hold (default: the user "
                             "group's largest stage)")


def _fail(message: str) -> int:
    print(f"ratelab plan: {message}", file=sys.stderr)
    return 2


def _flag_problem(args: argparse.Namespace) -> str | None:
    """The first numeric flag out of range (NaN passes no check: each is spelled so that
    it fails), or None."""
    if args.processes is not None and not args.processes >= 1:
        return f"--processes: expected an integer >= 1, got {args.processes}"
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        return f"--tolerance: expected a relative error >= 0, got {args.tolerance:g}"
    if not args.sample_items >= 1:
        return f"--sample-items: expected an integer >= 1, got {args.sample_items}"
    if not (math.isfinite(args.sample_span_s) and args.sample_span_s > 0):
        return f"--sample-span-s: expected virtual seconds > 0, got {args.sample_span_s:g}"
    if args.target_users is not None and not args.target_users >= 1:
        return f"--target-users: expected an integer >= 1, got {args.target_users}"
    return None


def _deadline_words(answer: dict[str, Any]) -> str:
    """A deadline answer in words: met or not, and the smallest change of each kind that
    meets it (or that none in the range searched does)."""
    from loadtests.planner.capacity import BATCH_SIZES, KEY_COUNTS, TIERS_TPM

    hours = answer["deadline_s"] / 3600
    if answer["meets_now"]:
        return f"meets the {hours:,.1f} h deadline as it is"
    words = {"keys": ("keys", "key count", KEY_COUNTS), "tier_tpm": ("TPM", "TPM", TIERS_TPM),
             "batch_size": ("items a request", "batch size", BATCH_SIZES)}
    found = []
    for key, (unit, kind, searched) in words.items():
        if key not in answer:
            continue  # not searched for this arm (batch size: batched arms only)
        hit = answer[key]
        found.append(f"{hit['value']:,} {unit}" if hit else
                     f"no {kind} up to {max(searched):,}")
    return f"misses the {hours:,.1f} h deadline; the smallest change meeting it: " + \
        "; ".join(found)


def _fidelity_failure(bad: list[dict[str, Any]], tolerance: float, time_scale: object,
                      steady_ok: list[dict[str, Any]] | None = None) -> str:
    """Which compared figures are outside the tolerance, the usual reason when the live
    run was time-compressed, and the steady rates that agree all the same."""
    listed = ", ".join(
        f"{r['arm']} {r['figure']} "
        + ("unknown" if r["error"] is None else f"{100 * r['error']:+.1f}%") for r in bad)
    text = (f"ratelab plan: {len(bad)} figure{'s' if len(bad) != 1 else ''} outside the "
            f"{100 * tolerance:g}% tolerance: {listed}")
    if isinstance(time_scale, int | float) and time_scale > 1:
        text += (f" (the live run was compressed {time_scale:g}-fold: each round trip's real "
                 "milliseconds count that many times over, which makes it a few percent "
                 "slower than the plan; docs/planner.md, Fidelity)")
    if steady_ok:
        text += "; the steady rate agrees: " + ", ".join(
            f"{r['arm']} {100 * r['error']:+.1f}%" for r in steady_ok)
    return text


def _capacity(scenario: Any, summary: dict[str, Any], sample: int,
              target_users: int | None = None, span_s: float = 600.0) -> dict[str, Any]:
    from loadtests.planner.batchsize import optimal_batch_size
    from loadtests.planner.capacity import deadline_answers, gpus_needed, users_held

    out: dict[str, Any] = {}
    if scenario.load.batch is not None:
        out["deadline"] = deadline_answers(scenario, summary, sample, span_s)
        for arm in scenario.load.batch.arms:
            if scenario.arm(arm).strategy == "semantic_batch":
                out["batch_size"] = optimal_batch_size(scenario, arm, sample_items=sample,
                                                         min_span_s=span_s)
                break
    users: dict[str, Any] = {}
    for group in scenario.load.users:
        limits = scenario.expect.for_arm(group.arm)
        slo = scenario.load.slo_search
        p95 = limits.get("max_latency_p95_ms", slo.threshold_ms if slo else 10_000.0)
        rate = limits.get("max_429_rate", limits.get("max_error_rate", 0.01))
        answer = users_held(scenario, group.name, max_p95_ms=p95, max_429_rate=rate)
        target = target_users or max((s.users or 0 for s in group.stages), default=0)
        arm = scenario.arm(group.arm)
        spec = scenario.provider(arm.providers[0])
        gpu = getattr(spec.config, "gpu", None)
        answer["target_users"] = target
        answer["gpus"] = gpus_needed(answer["users"], target) if gpu is not None else None
        users[group.name] = answer
    out["users"] = users
    return out


def main(args: argparse.Namespace) -> int:
    """Plan, write the run folder, print the headline (and the fidelity table)."""
    from loadtests.planner.assemble import PlanError
    from loadtests.planner.compare import fidelity_rows, fidelity_text
    from loadtests.planner.offline import offline_alternative
    from loadtests.planner.runfolder import write_run_folder
    from loadtests.planner.sim import PlanOptions, plan_scenario
    from loadtests.planner.sweep import (
        SweepError,
        parse_sweep,
        run_sweep,
        sweep_points,
        sweep_summary,
        sweep_text,
    )
    from loadtests.rundir import RunDirError, default_run_dir, prepare_run_dir
    from loadtests.scenario import ScenarioError, load_scenario
    from reports.summary import SummaryError, load_summary

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        return _fail(f"scenario refused:\n{exc}")
    if args.items is not None and args.items < 1:
        return _fail("--items: expected a positive item count")
    problem = _flag_problem(args)
    if problem:
        return _fail(problem)
    try:
        sweeps = [parse_sweep(s) for s in args.sweep] or [
            (k, tuple(v)) for k, v in scenario.sweep]
        points = sweep_points(scenario, sweeps) if sweeps else []
    except SweepError as exc:
        return _fail(str(exc))
    live = None
    options = PlanOptions(items=args.items)
    if args.compare is not None:
        try:
            live = load_summary(Path(args.compare) / "summary.json")
        except (SummaryError, OSError) as exc:
            return _fail(f"--compare {args.compare}: {exc}")
        # checked before planning: an empty table of another scenario's arms would pass
        if live.get("mode") != "live":
            return _fail(f"--compare {args.compare}: a {live.get('mode')} folder, not a live "
                         "run (ratelab run writes one)")
        if live.get("scenario") != scenario.name:
            return _fail(f"--compare {args.compare}: a run of scenario "
                         f"{live.get('scenario')!r}, not {scenario.name!r}")
        totals = [a["items"]["total"] for a in live["arms"] if a["items"]["total"]]
        partial = bool(live.get("partial")) or any(
            a["items"].get("pending") for a in live["arms"])
        # A run cut short is planned for as long as its arms ran: the live run spends its
        # first virtual seconds starting Locust and the users, which the plan does not.
        spans = [a["duration_s"] for a in live["arms"] if a.get("duration_s")]
        stop = (max(spans) if spans else scenario.duration_s) if partial else None
        options = PlanOptions(items=args.items or (totals[0] if totals else None),
                              stop_at_s=stop)
    # made before planning: an unusable --out is refused now, not after a long plan
    out = Path(args.out) if args.out else default_run_dir(f"{scenario.name}-plan")
    if args.compare is not None and out.resolve() == Path(args.compare).resolve():
        return _fail(f"--out {out}: the folder of the run --compare reads; choose another")
    try:
        prepare_run_dir(out, args.overwrite)
    except RunDirError as exc:
        return _fail(str(exc))
    try:
        result = plan_scenario(scenario, options)
    except PlanError as exc:
        return _fail(f"cannot plan {args.scenario}: {exc}")
    summary = result.summary()
    summary["plan"] = {"wall_s": result.wall_s, "steps": result.steps,
                       "requests": result.requests, "events_per_s": result.steps / max(
                           result.wall_s, 1e-9), "exit_status": result.status}
    summary["plan"]["offline"] = {
        a["name"]: o for a in summary["arms"]
        if a.get("lane") == "batch" and (o := offline_alternative(a)) is not None}
    if points:
        summary = sweep_summary(summary, run_sweep(scenario, points, items=args.items,
                                                   processes=args.processes))
    if args.capacity:
        summary["plan"].update(_capacity(scenario, summary, args.sample_items,
                                         args.target_users, args.sample_span_s))
    folder = write_run_folder(out, result, summary)
    for arm in summary["arms"]:
        t = arm["throughput"]
        proj = arm["projection"]
        line = (f"{arm['name']}: {t['items_per_min']:,.0f} items/min, "
                f"{t['requests_per_min']:,.0f} requests/min, "
                f"{arm['requests']['http_429']} 429s"
                + (f", bound by {arm['bound']['binding']}" if arm["bound"]["binding"] else ""))
        if proj["duration_s"]:  # interactive arms have no batch job to project
            line += (f"; {proj['items']:,} items in {proj['duration_s'] / 3600:,.1f} h, "
                     f"USD {proj['cost_usd'] or 0:,.2f}")
        print(line)
    print(f"planned in {result.wall_s:.2f} s ({result.requests:,} requests, "
          f"{summary['plan']['events_per_s']:,.0f} events/s); report: {folder}/report.html")
    if summary.get("grid", {}).get("rows"):
        print(f"sweep of {len(points)} points:")
        print(sweep_text(summary["grid"]))
    for name, answer in (summary["plan"].get("deadline") or {}).items():
        print(f"{name}: {_deadline_words(answer)}")
    if "batch_size" in summary["plan"] and summary["plan"]["batch_size"]["best"]:
        best = summary["plan"]["batch_size"]["best"]
        print(f"optimal batch size: {best['batch_size']} "
              f"({best['goodput_items_per_min']:,.0f} items/min goodput)")
    for group, answer in (summary["plan"].get("users") or {}).items():
        print(f"{group}: holds {answer['users']} users (p95 <= "
              f"{answer['threshold_p95_ms']:,.0f} ms); {answer['target_users']} users need "
              f"{answer['gpus']} GPU{'s' * (answer['gpus'] != 1)}")
    if live is not None:
        rows = fidelity_rows(summary, live)
        if not rows:
            return _fail(f"--compare {args.compare}: no arm of the run is an arm of this plan")
        print(fidelity_text(rows))
        bad = [r for r in rows if r["error"] is None or abs(r["error"]) > args.tolerance]
        if bad:
            steady = [r for r in rows if r["figure"] == "steady/min" and r not in bad]
            print(_fidelity_failure(bad, args.tolerance, live.get("time_scale"), steady),
                  file=sys.stderr)
        return 1 if bad else 0
    return 0
