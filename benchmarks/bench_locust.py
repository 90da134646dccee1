"""How many requests per second Locust plus the batching client push, with one Locust process
and with ``--processes 2``, against a zero-latency simulator whose limits are out of reach.

The simulator is served by ``ratelab serve`` in a process of its own and the scenario targets
it as an external URL, so the Locust processes run only the client (single-item requests,
strategy ``single``, 64 in flight per process, throttle off, ``time_scale`` 1). While each run
goes, this script samples the CPU time (user + system, ``/proc/PID/stat``) of every Locust
process (master and workers), of the simulator and of ``ratelab run`` itself, and reads the
job's span from the run folder (the job records and the run's origin), so it reports, over
the job's span only:

- requests per wall second (what the machine delivered), and
- requests per Locust CPU-second (what one core of Locust and the client can drive).

Locust scales with processes when the second figure holds from one to two processes: each
process then adds its core's worth. The wall figure can only scale as far as free cores
allow: on a machine with C cores the simulator's share caps it at about
``C / (Locust CPU per request + simulator CPU per request)``; this script prints that cap.
Rounds alternate 1 and 2 processes; medians and ratios are printed (the machine is shared).

    .venv/bin/python benchmarks/bench_locust.py [--items N] [--rounds R]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "RATELAB_BENCH_KEY"
KEY = "sk-bench"
TICKS = os.sysconf("SC_CLK_TCK")

PROVIDERS = """\
providers:
  - name: zero
    models: {gpt-4o-mini: {input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}
    keys: {sk-bench: {}}
    limits: {algorithm: sliding, window_s: 60, tpm: 1000000000, rpm: 10000000}
    responder: {kind: batch_json}
"""

SCENARIO = """\
name: bench-locust
seed: 1
time_scale: 1
duration_s: 600
target: {{base_url: "{url}", api_key_env: {env}, model: gpt-4o-mini}}
workload:
  items: {items}
  item_tokens: 15
  reply_tokens_per_item: 5
  system_prompt_tokens: 100
arms:
  - name: single
    strategy: single
    client:
      concurrency: {{limit: 64}}
      throttle: {{enabled: false}}
load:
  batch: {{}}
"""


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    """Every process below ``pid``."""
    rows = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            rows.append((int(entry.name), int(stat.rsplit(")", 1)[1].split()[1])))
    found: list[int] = []
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in rows if pp in frontier}
        found += frontier
    return found


def is_locust(pid: int) -> bool:
    try:
        return b"locust" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class Sampler:
    """CPU seconds of named processes over time (monotonic seconds), sampled every 50 ms."""

    runner: int
    simulator: int
    samples: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    locust: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_scan:  # new Locust processes appear at start and when it forks
                self.locust |= {p for p in children(self.runner) if is_locust(p)}
                next_scan = now + 0.5
            for pid in (self.runner, self.simulator, *self.locust):
                value = cpu_s(pid)
                if value is not None:
                    self.samples.setdefault(pid, []).append((time.monotonic(), value))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()

    def at(self, pid: int, t: float) -> float:
        """CPU seconds of ``pid`` at monotonic time ``t`` (linear between samples)."""
        points = self.samples.get(pid, [])
        if not points:
            return 0.0
        if t <= points[0][0]:
            return points[0][1] if points[0][0] - t < 0.2 else 0.0
        for (t0, v0), (t1, v1) in itertools.pairwise(points):
            if t0 <= t <= t1:
                return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
        return points[-1][1]

    def used(self, pids: set[int] | list[int], start: float, end: float) -> float:
        """CPU seconds ``pids`` used between monotonic ``start`` and ``end``."""
        return sum(self.at(p, end) - self.at(p, start) for p in pids)


def job_window(out: Path) -> tuple[float, float]:
    """Monotonic start and end of the batch job (time_scale 1: virtual = wall seconds)."""
    with sqlite3.connect(out / "slots.sqlite") as db:
        origin = float(db.execute("SELECT value FROM meta WHERE key='origin'").fetchone()[0])
    jobs = [json.loads(line) for path in out.glob("events-*.jsonl") for line in path.open()
            if line.startswith('{"type":"job"')]
    return origin + min(j["start_s"] for j in jobs), origin + max(j["end_s"] for j in jobs)


def run(items: int, processes: int, folder: Path, url: str, simulator: int) -> dict[str, float]:
    """One ``ratelab run``; the job's figures."""
    scenario = folder / "bench.yaml"
    scenario.write_text(SCENARIO.format(url=url, env=KEY_ENV, items=items))
    out = folder / f"p{processes}-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.cli", "run", str(scenario),
                             "--out", str(out), "--no-progress", "--processes", str(processes)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, KEY_ENV: KEY})
    sampler = Sampler(proc.pid, simulator)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    proc.wait()
    sampler.stop()
    thread.join()
    arm = json.loads((out / "summary.json").read_text())["arms"][0]
    start, end = job_window(out)
    span = end - start
    requests = arm["requests"]["total"]
    locust = sampler.used(sampler.locust, start, end)
    sim = sampler.used([simulator], start, end)
    return {
        "processes": processes, "locust_procs": len(sampler.locust),
        "items": arm["items"]["done"], "requests": requests,
        "failed": requests - arm["requests"]["ok"], "span_s": span,
        "per_s": requests / span, "locust_cpu_s": locust, "sim_cpu_s": sim,
        "runner_cpu_s": sampler.used([proc.pid], start, end),
        "per_locust_cpu_s": requests / locust if locust else 0.0,
        "sim_us": sim / requests * 1e6, "locust_us": locust / requests * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000, help="items (= requests) per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (1, 2) processes")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "providers.yaml"
        config.write_text(PROVIDERS)
        server = subprocess.Popen([sys.executable, "-m", "loadtests.cli", "serve", "--config",
                                   str(config), "--port", "0"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert server.stdout is not None
        found = re.search(r"http://127\.0\.0\.1:\d+", server.stdout.readline())
        assert found, "the simulator did not start"
        url = f"{found.group(0)}/v1"
        rows = []
        try:
            for _ in range(args.rounds):
                for processes in (1, 2):
                    rows.append(run(args.items, processes, Path(tmp), url, server.pid))
                    r = rows[-1]
                    print(f"# {processes} process(es): {r['per_s']:,.0f} req/s wall, "
                          f"{r['per_locust_cpu_s']:,.0f} req per Locust CPU-s", flush=True)
        finally:
            server.terminate()
            server.wait(20)
    print(f"\n{cores} cores; {args.items:,} single-item requests per run; medians of "
          f"{args.rounds} rounds\n")
    print("| processes | Locust processes | requests | failed | job span (s) | requests/s (wall) "
          "| Locust CPU-s | requests per Locust CPU-s | Locust us/request "
          "| simulator us/request | `ratelab run` CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    med: dict[int, dict[str, float]] = {}
    for processes in (1, 2):
        mine = [r for r in rows if r["processes"] == processes]
        med[processes] = {k: statistics.median(r[k] for r in mine) for k in mine[0]}
        m = med[processes]
        print(f"| {processes} | {m['locust_procs']:.0f} | {m['requests']:,.0f} | "
              f"{m['failed']:,.0f} | {m['span_s']:.2f} | **{m['per_s']:,.0f}** | "
              f"{m['locust_cpu_s']:.2f} | **{m['per_locust_cpu_s']:,.0f}** | "
              f"{m['locust_us']:.0f} | {m['sim_us']:.0f} | {m['runner_cpu_s']:.2f} |")
    print()
    wall = med[2]["per_s"] / med[1]["per_s"]
    per_cpu = med[2]["per_locust_cpu_s"] / med[1]["per_locust_cpu_s"]
    print(f"2 vs 1 process: wall requests/s x{wall:.2f}, requests per Locust CPU-s "
          f"x{per_cpu:.2f}")
    for processes in (1, 2):
        m = med[processes]
        cap = cores / ((m["locust_us"] + m["sim_us"]) * 1e-6)
        print(f"{processes} process(es): {cores} cores shared by Locust "
              f"({m['locust_us']:.0f} us/request) and the simulator ({m['sim_us']:.0f} us) cap "
              f"the wall rate at about {cap:,.0f} requests/s")


if __name__ == "__main__":
    main()
