"""Helpers of the live-run tests: ``ratelab run`` in a subprocess, its summary, its processes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"


def ratelab_run(scenario: Path, out: Path, *extra: str, timeout: float = 150,
                env: dict[str, str] | None = None) -> int:
    """Run ``ratelab run`` in a subprocess; returns its exit status."""
    cmd = [sys.executable, "-m", "loadtests.cli", "run", str(scenario), "--out", str(out),
           "--no-progress", *extra]
    return subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True,
                          env=env).returncode


def summary(out: Path) -> dict[str, Any]:
    """The run folder's summary.json."""
    return dict(json.loads((out / "summary.json").read_text()))


# Expectations about pace: how close to its limit a time-compressed live run keeps, and
# the 429s drawn by the bursts of a client that fell behind. Both follow the machine's load
# (other processes on its two cores), so a test whose point is elsewhere accepts a run
# that missed only these; the tests about pace assert them themselves.
PACE_THRESHOLDS = frozenset({"min_efficiency", "max_429_rate"})


def assert_completed(status: int, out: Path) -> dict[str, Any]:
    """The run ended by itself with exit 0, or 1 with only pace expectations missed; its
    summary."""
    s = summary(out)
    missed = {c["threshold"] for c in s["checks"] if not c["ok"]}
    assert status == 0 or (status == 1 and missed <= PACE_THRESHOLDS), (status, missed)
    return s


def arm(s: dict[str, Any], name: str) -> dict[str, Any]:
    """The arm ``name`` of a summary."""
    return next(a for a in s["arms"] if a["name"] == name)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid="], capture_output=True, text=True)
    rows = [tuple(int(x) for x in line.split()) for line in out.stdout.splitlines()]
    found: list[int] = []
    frontier = {pid}
    while frontier:
        children = {p for p, pp, _ in rows if pp in frontier}
        found += children
        frontier = children
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process. A zombie is not: it has exited and waits only for
    its parent to collect its status (an orphaned Locust worker's parent is then pid 1, which
    in a container may never collect it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def survivors(pids: list[int], wait_s: float = 10.0) -> list[int]:
    """Those of ``pids`` still running after up to ``wait_s`` seconds (SIGKILL is delivered
    asynchronously: give a process group a moment to die)."""
    deadline = time.monotonic() + wait_s
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def locust_counts(out: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(type, name) -> (count, failures) of the run folder's ``locust_stats.csv``."""
    with (out / "locust_stats.csv").open(newline="") as fh:
        return {(row["Type"], row["Name"]): (int(row["Request Count"]),
                                             int(row["Failure Count"]))
                for row in csv.DictReader(fh) if row["Name"] != "Aggregated"}


def locust_mismatches(out: Path, s: dict[str, Any]) -> list[str]:
    """Where Locust's statistics (``events.request``, by request type) disagree with the
    summary's counts, arm by arm; empty when every request and item is in both."""
    rows = locust_counts(out)
    problems: list[str] = []

    def check(key: tuple[str, str], count: int, failures_too: bool) -> None:
        got = rows.get(key, (0, 0))
        want = (count, count if failures_too else 0)
        if got != want:
            problems.append(f"{key}: Locust (count, failures) {got}, summary {want}")

    for a in s["arms"]:
        name, r, items = a["name"], a["requests"], a["items"]
        check(("REQ", name), r["ok"], False)
        check(("429", name), r["http_429"], True)
        check(("ERR", name), r["total"] - r["ok"] - r["http_429"], True)
        check(("ITEM", f"{name}:done"), items["done"] - items["cached"], False)
        check(("ITEM", f"{name}:cached"), items["cached"], False)
        check(("ITEM", f"{name}:dead_letter"), items["dead_letter"], True)
        check(("ITEM", f"{name}:requeued"), items["requeued"], False)
    return problems
