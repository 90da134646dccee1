"""How many requests per second Locust plus the batching client push: one Locust process, then
``--processes 2``, against a zero-latency simulator with limits far out of reach.

``ratelab run`` serves the simulator from its own (parent) process, so Locust's processes
only run the client. Single-item requests (strategy ``single``), 64 in flight per process,
``time_scale`` 1 so virtual and wall seconds coincide. Prints requests/s over each job's span.

    .venv/bin/python benchmarks/bench_locust.py [ITEMS]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCENARIO = """
name: bench-locust
seed: 1
time_scale: 1
duration_s: 600
providers:
  - name: zero
    models:
      gpt-4o-mini: {{input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}
    keys:
      sk-ratelab: {{}}
    limits: {{algorithm: sliding, window_s: 60, tpm: 1000000000, rpm: 10000000}}
    latency:
      ttft_s: {{dist: constant, value: 0}}
      itl_s: {{dist: constant, value: 0}}
    responder: {{kind: batch_json}}
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


def run(items: int, processes: int, folder: Path) -> dict[str, float]:
    """One ``ratelab run``; returns requests, span and requests/s of the job."""
    scenario = folder / "bench.yaml"
    scenario.write_text(SCENARIO.format(items=items))
    out = folder / f"p{processes}"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "loadtests.cli", "run", str(scenario), "--out",
                    str(out), "--no-progress", "--processes", str(processes)], cwd=ROOT,
                   check=False, capture_output=True)
    wall = time.monotonic() - started
    arm = json.loads((out / "summary.json").read_text())["arms"][0]
    span = arm["duration_s"]
    return {"processes": processes, "items": arm["items"]["done"],
            "requests": arm["requests"]["total"], "errors": arm["requests"]["total"]
            - arm["requests"]["ok"], "span_s": span,
            "requests_per_s": arm["requests"]["total"] / span if span else 0.0, "wall_s": wall}


def main() -> None:
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 30000
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(items, p, Path(tmp)) for p in (1, 2)]
    print("| processes | items done | requests | failed | job span (s) | requests/s | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['items']:,} | {r['requests']:,} | {r['errors']:,} | "
              f"{r['span_s']:.1f} | **{r['requests_per_s']:,.0f}** | {r['wall_s']:.1f} |")
    print(f"scaling with 2 processes: {rows[1]['requests_per_s'] / rows[0]['requests_per_s']:.2f}x")


if __name__ == "__main__":
    main()
