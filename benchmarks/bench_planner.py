"""Planner speed: the 2,000,000-item seed job in virtual time, and a 5x5 sweep of it.

Run: .venv/bin/python benchmarks/bench_planner.py [ITEMS] [SWEEP_ITEMS]
Prints wall and CPU seconds, SimPy events per second, requests simulated and us per item.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from loadtests.planner.sim import PlanOptions, plan_scenario
from loadtests.planner.sweep import run_sweep, sweep_points
from loadtests.scenario import load_scenario, with_overrides

SCENARIO = (Path(__file__).resolve().parent.parent / "scenarios"
            / "seed001-semantic-batching.yaml")


def main() -> None:
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
    sweep_items = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    base = load_scenario(SCENARIO)
    # the batched arm alone, as seed-001's job
    scenario = with_overrides(base, {"load.batch.arms": ["semantic_batch"]})
    start = time.perf_counter()
    cpu = time.process_time()
    result = plan_scenario(scenario, PlanOptions(items=items))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    arm = next(a for a in result.summary()["arms"] if a["name"] == "semantic_batch")
    print(f"plan {items:,} items: {wall:.1f} s wall ({cpu:.1f} s CPU, "
          f"{cpu / items * 1e6:.1f} us/item), {result.requests:,} requests, "
          f"{result.steps:,} events, {result.steps / wall:,.0f} events/s, "
          f"{result.requests / wall:,.0f} requests/s; job {arm['duration_s'] / 3600:.2f} h "
          f"virtual at {arm['throughput']['items_per_min']:,.0f} items/min")
    points = sweep_points(scenario, [
        ("arms.semantic_batch.client.batch.max_items", (5, 10, 20, 30, 40)),
        ("providers.main.limits.tpm",
         (100_000, 200_000, 400_000, 800_000, 1_600_000)),
    ])
    start = time.perf_counter()
    sweep = run_sweep(scenario, points, items=sweep_items)
    print(f"5x5 sweep of {sweep_items:,} items a point: {time.perf_counter() - start:.1f} s wall"
          f" ({len(sweep['rows'])} points)")


if __name__ == "__main__":
    main()
