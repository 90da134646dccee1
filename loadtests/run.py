"""``ratelab run SCENARIO.yaml``: the simulator, Locust driving the batching client, a run folder.

The scenario is validated first (exit 2 naming file, line and key). The simulator serves the
scenario's providers from a thread of this process on a free loopback port (or the scenario's
external ``target`` is used, its key read from the named environment variable and never
written). Locust runs as a subprocess in its own session (``--processes N`` for Locust's own
master and workers); this process tails the event logs for the progress line and the
error-rate guard, performs scheduled top-ups, and, once Locust has exited, merges the events
into ``summary.json``, ``timeseries.csv``, ``report.md`` and ``report.html``. Ctrl-C stops
Locust and the simulator and writes a partial summary.

With ``--ui`` Locust serves its web UI on loopback instead of starting at once: virtual time
starts when the swarm is started there (the Start button, or ``POST /swarm``), and the run ends
by itself when the swarm stops (the scenario's load is over: a complete summary; the UI's
Stop: a partial one, ``stopped: ui_stop``) or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtests.progress import EventTail, guard_tripped, render
from loadtests.recorder import recorder_for, write_timeseries_csv
from loadtests.run_gateway import GatewayStartError, serve_gateway
from loadtests.run_plans import LiveSweep, parse_set, run_scenario
from loadtests.run_setup import SetupError, bound_inputs, client_config, job_items
from loadtests.rundir import (
    SLOTS_FILE,
    SPEC_ENV,
    SPEC_FILE,
    SWARM_END,
    RunDirError,
    RunSpec,
    SlotClaims,
    default_run_dir,
    prepare_run_dir,
    read_run,
)
from loadtests.scenario_model import Scenario
from loadtests.scenario_schema import ScenarioError

HELP = "Run a scenario live: simulator + Locust driving the batching client; writes a run folder."
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
STOP_GRACE_S = 15.0
LOG_PROGRESS_EVERY_S = 5.0  # wall seconds between progress lines when stderr is no terminal
WEB_HOST = "127.0.0.1"  # the web UI serves loopback only: it can start and stop the run
DEFAULT_WEB_PORT = 8089  # Locust's own default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ratelab run``."""
    parser.add_argument("scenario", metavar="SCENARIO.yaml", help="scenario file")
    parser.add_argument("--out", help="run folder (default runs/<scenario>-<timestamp>/); "
                        "refused if it holds files")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --out: replace the run already in that folder")
    parser.add_argument("--processes", type=int, default=1,
                        help="Locust worker processes (distributed on this machine)")
    parser.add_argument("--ui", action="store_true",
                        help="serve Locust's web UI on loopback instead of running headless: "
                             "start the swarm there; the run ends when its load is over, "
                             "when stopped there, or on Ctrl-C")
    parser.add_argument("--web-port", type=int, default=DEFAULT_WEB_PORT,
                        help=f"with --ui: the web UI's port (default {DEFAULT_WEB_PORT}; "
                             "0 picks a free one)")
    parser.add_argument("--duration-s", type=float, help="override duration_s (virtual seconds)")
    parser.add_argument("--items", type=int, help="override the workload's item count")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario key (dotted; arms and providers by name), "
                             "e.g. arms.gated.client.batch.max_items=10; repeatable")


class _Interrupted(Exception):
    """SIGINT (or SIGTERM) arrived while Locust was running."""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise _Interrupted()


@contextlib.contextmanager
def _simulator(scenario: Scenario) -> Iterator[tuple[dict[str, str], str | None, str]]:
    """Serve the scenario's providers (or nothing, for an external target): URLs, admin URL."""
    if scenario.target is not None:
        yield {}, None, ""
        return
    from simulator.model.config import SimulatorConfig
    from simulator.server import serve_in_thread

    config = SimulatorConfig(
        providers=tuple(p.config for p in scenario.providers),  # type: ignore[misc]
        time_scale=scenario.time_scale,
        seed=scenario.seed,
    )
    with serve_in_thread(config) as server:
        urls = {p.name: server.base_url(p.name) for p in scenario.providers}
        yield urls, server.url, config.admin_token


def _topup(admin_url: str, token: str, provider: str, key: str, usd: float) -> None:
    body = json.dumps({"key": key, "usd": usd}).encode()
    request = urllib.request.Request(
        f"{admin_url}/admin/{provider}/topup", data=body, method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()


def free_port(host: str = WEB_HOST) -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def locust_command(spec: RunSpec, run_dir: Path, processes: int,
                   web_port: int | None) -> list[str]:
    """The Locust command line of a run: headless with CSV and HTML reports, or (``web_port``
    given) the web UI on loopback, with the same reports written when Locust quits."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE),
           "--csv", str(run_dir / "locust"), "--html", str(run_dir / "locust.html"),
           "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    if web_port is not None:
        cmd += ["--web-host", WEB_HOST, "--web-port", str(web_port)]
    else:
        cmd += ["--headless", "--only-summary"]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    return cmd


def _stop(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT to Locust's master (it saves its reports and stops its workers), then SIGKILL
    whatever is left of its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _tpm_limit(scenario: Scenario, bounds: Mapping[str, Any]) -> float | None:
    limits = [b.tpm * max(1, b.keys) for b in bounds.values() if b is not None and b.tpm]
    return max(limits) if limits else None


def _bounds(scenario: Scenario, urls: Mapping[str, str], run_dir: Path) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for arm in scenario.arms:
        if arm.strategy == "interactive":
            continue
        config = client_config(scenario, arm, urls or {p: "http://127.0.0.1:1/v1"
                                                       for p in arm.providers}, run_dir)
        found = bound_inputs(scenario, arm, config)
        if found is not None:
            bounds[arm.name] = found
    return bounds


def summarise(scenario: Scenario, run_dir: Path, bounds: Mapping[str, Any], *, partial: bool,
              stopped: str | None, meta: Mapping[str, Any], sweep: LiveSweep | None = None,
              parts: Sequence[tuple[Path, float]] = (),
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge the run folder's events (or those of ``parts``: folder and virtual-time offset,
    the SLO probes) into summary.json, timeseries.csv and the report."""
    from reports.report import write_report
    from reports.summary import write_summary

    events: list[Any] = []
    records: list[dict[str, Any]] = []
    for folder, offset in parts or ((run_dir, 0.0),):
        found, others = read_run(folder)
        events += [dataclasses.replace(e, t=e.t + offset) for e in found] if offset else found
        records += others
    sweep = sweep or LiveSweep()
    recorder = recorder_for(scenario, "live", bounds, sweep_values=sweep.values,
                            sweep_key=sweep.key)
    recorder.meta.update(meta)
    recorder.add_many(events)
    jobs = [r for r in records if r.get("type") == "job"]
    batch = scenario.load.batch
    slots = int(meta.get("processes", 1))
    pending: dict[str, int] = {}
    if any(r.get("type") == "job_failed" for r in records) and not partial:
        # a batch slot crashed (see locust.log): the run did not finish its work
        partial, stopped = True, stopped or "batch_failed"
    for alert in (r for r in records if r.get("type") == "alert"):
        recorder.balance_alert(str(alert["arm"]), float(alert["t"]), alert.get("balance_usd"))
    stops = [r for r in records if r.get("type") == "stop"]
    if stops:
        # a Locust process stopped its work itself (its share of the spend cap was spent)
        partial, stopped = True, stopped or str(stops[0].get("reason"))
    for name in batch.arms if batch else ():
        mine = [j for j in jobs if j["arm"] == name]
        for job in mine:
            recorder.job_stopped(name, int(job.get("exit_status") or 0),
                                 str(job.get("reason") or ""))
        acc = recorder._acc[name]
        settled = acc.items["done"] + acc.items["cached"] + acc.items["dead_letter"]
        if len(mine) == slots and not partial:
            pending[name] = sum(int(j["pending"]) for j in mine)
            recorder.mark(name, min(j["start_s"] for j in mine), max(j["end_s"] for j in mine))
        else:
            # an interrupted slot left no job record: what it did not settle is pending, not lost
            pending[name] = max(0, job_items(scenario) - settled)
    summary = recorder.summary(partial=partial, pending=pending)
    summary["stopped"] = stopped
    summary.update(extra or {})
    write_summary(summary, run_dir / "summary.json")
    write_timeseries_csv(recorder.timeseries_rows(), run_dir / "timeseries.csv")
    write_report(run_dir)
    return summary


def main(args: argparse.Namespace) -> int:
    """Run the scenario; 0 when it completed and its expectations hold, 1 when one failed or
    the error guard stopped it, 2 on unusable input, 130 when interrupted."""
    # flags checked as flags: within the scenario they would be named as its first line
    if args.items is not None and args.items < 1:
        print(f"ratelab run: --items: expected a positive item count, got {args.items}",
              file=sys.stderr)
        return EXIT_INPUT
    if args.duration_s is not None and not (math.isfinite(args.duration_s)
                                            and args.duration_s > 0):
        print(f"ratelab run: --duration-s: expected virtual seconds > 0, got "
              f"{args.duration_s:g}", file=sys.stderr)
        return EXIT_INPUT
    try:
        overrides = dict(parse_set(text) for text in args.set)
        scenario, sweep = run_scenario(args.scenario, args.duration_s, args.items, overrides)
    except ScenarioError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INPUT
    except ValueError as exc:
        print(f"ratelab run: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if args.processes < 1:
        print("ratelab run: --processes: expected an integer >= 1", file=sys.stderr)
        return EXIT_INPUT
    if scenario.load.slo_search is not None and scenario.load.batch is not None:
        print(f"{args.scenario}: load.slo_search: an SLO search probes user groups only; "
              "drop load.batch (or search in a scenario of its own)", file=sys.stderr)
        return EXIT_INPUT
    if args.ui and scenario.load.slo_search is not None:
        # each probe is a Locust run of its own: a person would have to press Start each time
        print(f"{args.scenario}: load.slo_search: --ui drives one swarm; run the search "
              "headless", file=sys.stderr)
        return EXIT_INPUT
    if args.ui and scenario.gateway is not None:
        print(f"{args.scenario}: gateway: --ui is not supported for gateway scenarios; run "
              "them headless", file=sys.stderr)
        return EXIT_INPUT
    if args.ui and not 0 <= args.web_port <= 65535:
        print("ratelab run: --web-port: expected a port number (0 picks a free one)",
              file=sys.stderr)
        return EXIT_INPUT
    target_env = scenario.target.api_key_env if scenario.target else None
    if target_env and not os.environ.get(target_env):
        print(f"{args.scenario}: target.api_key_env: ${target_env} is not set", file=sys.stderr)
        return EXIT_INPUT
    run_dir = Path(args.out) if args.out else default_run_dir(scenario.name)
    try:
        prepare_run_dir(run_dir, args.overwrite)
    except RunDirError as exc:
        print(f"ratelab run: {exc}", file=sys.stderr)
        return EXIT_INPUT
    try:
        bounds = _bounds(scenario, {}, run_dir)
    except (SetupError, ValueError) as exc:
        print(f"{args.scenario}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in signals}
    try:
        return _run(args, scenario, run_dir, bounds, target_env, overrides, sweep)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass(slots=True)
class _Served:
    """What a Locust run needs from the parent: the served URLs and the admin API."""

    urls: dict[str, str]
    admin_url: str | None
    admin_token: str
    target_env: str | None


def locust_once(args: argparse.Namespace, scenario: Scenario, run_dir: Path, served: _Served,
                bounds: Mapping[str, Any], overrides: Mapping[str, Any],
                duration_s: float | None) -> tuple[str | None, int | None]:
    """One Locust run of ``scenario`` into ``run_dir``: (why it stopped early, Locust's exit
    status). _Interrupted propagates after Locust is stopped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = RunSpec(
        scenario_path=str(Path(args.scenario).resolve()), run_dir=str(run_dir.resolve()),
        origin_monotonic=time.monotonic(), time_scale=scenario.time_scale,
        provider_urls=served.urls, slots=args.processes, duration_s=duration_s,
        items=args.items, admin_url=served.admin_url, target_key_env=served.target_env,
        headless=not args.ui, overrides=dict(overrides),
    )
    spec.write(run_dir / SPEC_FILE)
    env = {**os.environ, SPEC_ENV: str((run_dir / SPEC_FILE).resolve())}
    web_port = None
    if args.ui:
        web_port = args.web_port or free_port()
        print(f"ratelab run: Locust's web UI at http://{WEB_HOST}:{web_port}/ ; start the "
              "swarm there (the scenario sets the users). The run ends when its load is "
              "over, when stopped there, or on Ctrl-C.", file=sys.stderr, flush=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with (run_dir / "locust.log").open("wb") as log:
            proc = subprocess.Popen(locust_command(spec, run_dir, args.processes, web_port),
                                    env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            stopped = _watch(proc, scenario, run_dir, spec, bounds, served,
                             show=not args.no_progress)
            return stopped, proc.returncode
    finally:
        if proc is not None and proc.poll() is None:
            _stop(proc)
        elif proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def _run(args: argparse.Namespace, scenario: Scenario, run_dir: Path, bounds: dict[str, Any],
         target_env: str | None, overrides: Mapping[str, Any], sweep: LiveSweep) -> int:
    interrupted = False
    stopped: str | None = None
    exit_code: int | None = None
    started = time.monotonic()
    parts: list[tuple[Path, float]] = []
    extra: dict[str, Any] = {}
    try:
        with _simulator(scenario) as (urls, admin_url, admin_token), \
                serve_gateway(scenario, urls, admin_url, admin_token, run_dir) as gateway:
            served = _Served(urls, admin_url, admin_token, target_env)
            if scenario.load.slo_search is not None:
                from loadtests.run_slo import search

                def probe(folder: Path, probe_overrides: Mapping[str, Any]) -> str | None:
                    return locust_once(args, scenario, folder, served, bounds,
                                       {**overrides, **probe_overrides}, None)[0]

                result = search(scenario, run_dir, probe, parts)
                extra["slo_search"] = result
                stopped = None
                exit_code = 0
            else:
                stopped, exit_code = locust_once(args, scenario, run_dir, served, bounds,
                                                 overrides, args.duration_s)
                if gateway is not None:
                    extra["gateway"] = gateway.finish(run_dir)
    except _Interrupted:
        interrupted = True
        stopped = "interrupted"
    except GatewayStartError as exc:
        print(f"ratelab run: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not args.no_progress:
        print(file=sys.stderr)
    meta = {"processes": args.processes, "locust_exit": exit_code,
            "wall_s": round(time.monotonic() - started, 3), "run_dir": str(run_dir)}
    if overrides:
        meta["overrides"] = dict(overrides)
    summary = summarise(scenario, run_dir, bounds, partial=interrupted or stopped is not None,
                        stopped=stopped, meta=meta, sweep=sweep, parts=parts, extra=extra)
    if exit_code not in (0, None) and not interrupted:
        print(f"ratelab run: Locust exited with {exit_code}; see {run_dir / 'locust.log'}",
              file=sys.stderr)
    # The report's first paragraph answers how fast, how much, which limit binds.
    from reports.report import headline
    print(headline(summary).replace("**", ""))
    print(f"run folder: {run_dir} (report: {run_dir / 'report.html'})", file=sys.stderr)
    if interrupted or stopped == "ui_stop":
        return EXIT_INTERRUPTED
    if summary.get("stopped") == "batch_failed":
        print(f"ratelab run: a batch job failed; see {run_dir / 'locust.log'}", file=sys.stderr)
    if summary.get("stopped") is not None or not summary.get("ok", True):
        return EXIT_FAILED
    return EXIT_OK


def _watch(proc: subprocess.Popen[bytes], scenario: Scenario, run_dir: Path, spec: RunSpec,
           bounds: Mapping[str, Any], served: _Served, show: bool) -> str | None:
    """Wait for Locust, printing progress, doing top-ups; returns why it was stopped early."""
    tail = EventTail(run_dir)
    guard = scenario.load.error_guard
    max_rate = guard.max_error_rate
    if scenario.target is not None:
        max_rate = min(max_rate, scenario.target.max_error_rate)
    cap = scenario.target.spend_cap_usd if scenario.target else None
    topups = sorted(scenario.load.topups, key=lambda t: t.at_s)
    items_total = job_items(scenario) * (len(scenario.load.batch.arms) if scenario.load.batch
                                         else 0)
    tpm = _tpm_limit(scenario, bounds)
    claims: SlotClaims | None = None
    origin: float | None = None
    tty = sys.stderr.isatty()
    next_line = 0.0
    while proc.poll() is None:
        time.sleep(0.25)
        totals = tail.poll()
        if origin is None or not spec.headless:
            # virtual time starts when Locust has loaded the run, or with the web UI when the
            # swarm starts (rundir.started, rundir.swarm_started)
            claims = claims or SlotClaims(run_dir / SLOTS_FILE)
            origin = claims.get("origin")
            swarm_end = None if spec.headless else claims.get(SWARM_END)
            if swarm_end is not None:
                # the web UI's swarm stopped: Locust saves its reports as it quits
                _stop(proc)
                claims.close()
                return None if swarm_end == 1.0 else "ui_stop"
        now = -1.0 if origin is None else (time.monotonic() - origin) * spec.time_scale
        while topups and topups[0].at_s <= now and served.admin_url:
            t = topups.pop(0)
            _topup(served.admin_url, served.admin_token, t.provider, t.key, t.usd)
        if show and tty:
            print("\r" + render(totals, items_total, tpm), end="", file=sys.stderr, flush=True)
        elif show and time.monotonic() >= next_line:
            # a log (CI, a pipe): one line every few seconds rather than carriage returns
            print(render(totals, items_total, tpm), file=sys.stderr, flush=True)
            next_line = time.monotonic() + LOG_PROGRESS_EVERY_S
        if guard_tripped(totals, max_rate, guard.min_requests):
            _stop(proc)
            return "error_guard"
        if cap is not None and (totals.cost_usd >= cap
                                or len(totals.capped) >= max(1, spec.slots)):
            _stop(proc)
            return "spend_cap"
    if claims is not None:
        claims.close()
    return None
