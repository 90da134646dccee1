"""Planner speed: the 2,000,000-item seed-001 job in virtual time, and a 5x5 sweep of it.

Run: .venv/bin/python benchmarks/bench_planner.py [--items N] [--sweep-items M]
         [--rounds R] [--before DIR] [--skip-sweep]
     .venv/bin/python benchmarks/bench_planner.py --instructions [--lengths N1 N2]
         [--before DIR]

Each plan runs in its own child process (one core: the planner is single-threaded) and
reports CPU seconds, wall seconds, SimPy events per second, requests and microseconds of
CPU per item, plus the plan's own figures (virtual duration, items/min), which must be the
same for every tree. ``--before DIR`` names another checkout of ratelab (e.g. made with
``git worktree add /tmp/planner-before <rev>``): its planner is run by the same driver, the
two trees alternating for ``--rounds`` rounds, and the medians and their ratio printed
side by side. The sweep (batch size x TPM, 25 points, two worker processes) plans the
batched arm alone at ``--sweep-items`` items a point and reports its wall seconds.

``--instructions`` counts instructions instead of seconds (``valgrind --tool=callgrind``,
immune to the machine's load; fixed hash seed): plans of N1 and N2 items at the arm's batch
size and of N2 items at twice it, per tree, two at a time. Since a plan costs start-up plus
``a`` per request plus ``b`` per item, the two plans of N2 items give ``a`` (their
difference over their difference in requests) and the two lengths the rest, ``b``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
SCENARIO = Path("scenarios") / "seed001-semantic-batching.yaml"
ARM = "semantic_batch"
# the batched arm alone, as seed-001's job
ONLY_BATCHED = {"load.batch.arms": [ARM]}
SWEEP = (
    ("arms.semantic_batch.client.batch.max_items", (5, 10, 20, 30, 40)),
    ("providers.main.limits.tpm", (100_000, 200_000, 400_000, 800_000, 1_600_000)),
)


def _child_plan(tree: Path, items: int, batch: int | None = None) -> dict[str, Any]:
    from loadtests.planner.sim import PlanOptions, plan_scenario
    from loadtests.scenario import load_scenario, with_overrides

    overrides: dict[str, object] = dict(ONLY_BATCHED)
    if batch is not None:
        overrides[f"arms.{ARM}.client.batch.max_items"] = batch
    scenario = with_overrides(load_scenario(tree / SCENARIO), overrides)
    wall = time.perf_counter()
    cpu = time.process_time()
    result = plan_scenario(scenario, PlanOptions(items=items))
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    arm = next(a for a in result.summary()["arms"] if a["name"] == ARM)
    return {"cpu_s": cpu, "wall_s": wall, "requests": result.requests, "events": result.steps,
            "duration_s": arm["duration_s"], "items_per_min": arm["throughput"]["items_per_min"],
            "items_done": arm["items"]["done"],
            # the planning process's peak resident memory (Linux reports kilobytes)
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child_sweep(tree: Path, items: int) -> dict[str, Any]:
    from loadtests.planner.sweep import run_sweep, sweep_points
    from loadtests.scenario import load_scenario

    base = load_scenario(tree / SCENARIO)
    # the arm selection rides in every point: each worker reloads the scenario from its file
    points = sweep_points(base, [("load.batch.arms", ([ARM],)), *SWEEP])
    wall = time.perf_counter()
    sweep = run_sweep(base, points, items=items, processes=2)
    wall = time.perf_counter() - wall
    rows = sweep["rows"]
    return {"wall_s": wall, "points": len(points), "rows": len(rows),
            "best": sweep["best"][ARM]["point"]}


def _run(tree: Path, mode: str, items: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--tree", str(tree),
                           "--items", str(items)], env=env, cwd=tree, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {mode} failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _callgrind(tree: Path, items: int, batch: int | None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           __file__, "--child", "plan", "--tree", str(tree), "--items", str(items)]
    if batch is not None:
        cmd += ["--batch", str(batch)]
    return subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _collected(proc: subprocess.Popen[str]) -> tuple[int, int]:
    """(instructions, requests) of a finished callgrind probe."""
    out, err = proc.communicate()
    found = re.search(r"Collected : (\d+)", err)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"callgrind probe failed:\n{err[-2000:]}")
    return int(found.group(1)), int(json.loads(out.strip().splitlines()[-1])["requests"])


def instructions(trees: list[tuple[str, Path]], lengths: tuple[int, int]) -> None:
    """Instructions per item and per request of each tree's planner (module docstring)."""
    from batchclient.config import ClientConfig
    from loadtests.scenario import load_scenario

    arm = next(a for a in load_scenario(HERE / SCENARIO).arms if a.name == ARM)
    assert isinstance(arm.client_config, ClientConfig)
    batch = arm.client_config.batch.max_items
    n1, n2 = lengths
    probes = [(name, tree, n, b) for name, tree in trees
              for n, b in ((n1, None), (n2, None), (n2, 2 * batch))]
    results: dict[tuple[str, int, int | None], tuple[int, int]] = {}
    for i in range(0, len(probes), 2):
        running = [(p, _callgrind(p[1], p[2], p[3])) for p in probes[i:i + 2]]
        for (name, _, n, size), proc in running:
            results[name, n, size] = _collected(proc)
    print(f"callgrind, plans of {n1:,} and {n2:,} items at batch {batch} and {n2:,} at "
          f"batch {2 * batch}")
    per_item: dict[str, float] = {}
    for name, _ in trees:
        (i1, r1), (i2, r2), (i3, r3) = (results[name, n1, None], results[name, n2, None],
                                        results[name, n2, 2 * batch])
        slope = (i2 - i1) / (n2 - n1)
        request = (i2 - i3) / (r2 - r3)
        item = (i2 - i1 - request * (r2 - r1)) / (n2 - n1)
        per_item[name] = slope
        print(f"  {name:>7}: {slope:,.0f} instructions per item at batch {batch} "
              f"({r2:,} requests); {request:,.0f} per request + {item:,.0f} per item")
    if "before" in per_item:
        print(f"after/before instructions per item: "
              f"{per_item['after'] / per_item['before']:.3f}")


def _plan_line(name: str, r: dict[str, Any], items: int) -> str:
    cpu, wall, requests, events = r["cpu_s"], r["wall_s"], r["requests"], r["events"]
    return (f"{name:>7}: {cpu:6.1f} s CPU, {wall:6.1f} s wall, {cpu / items * 1e6:5.1f} us/item,"
            f" {requests:,} requests, {events:,} SimPy events ({events / cpu:,.0f}/CPU s,"
            f" {requests / cpu:,.0f} requests/CPU s), peak {r['peak_mb']:,.0f} MB;"
            f" job {r['duration_s'] / 3600:.2f} h virtual at {r['items_per_min']:,.0f} items/min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--sweep-items", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--child", choices=("plan", "sweep"), default=None)
    parser.add_argument("--tree", type=Path, default=HERE)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--instructions", action="store_true",
                        help="instructions per item and per request under callgrind")
    parser.add_argument("--lengths", type=int, nargs=2, default=(20_000, 60_000),
                        metavar=("N1", "N2"), help="--instructions: the two plan lengths")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child_plan(args.tree, args.items, args.batch) if args.child == "plan"
                         else _child_sweep(args.tree, args.items)))
        return
    trees = [("after", HERE)] + ([("before", args.before.resolve())] if args.before else [])
    if args.instructions:
        instructions(trees, (args.lengths[0], args.lengths[1]))
        return
    print(f"plan of seed-001's batched arm, {args.items:,} items, {args.rounds} round(s); "
          f"load average {os.getloadavg()[0]:.2f} at start")
    plans: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, tree in reversed(trees):
            r = _run(tree, "plan", args.items)
            plans[name].append(r)
            print("  " + _plan_line(name, r, args.items), flush=True)
    medians = {name: statistics.median(r["cpu_s"] for r in rs) for name, rs in plans.items()}
    for name, cpu in medians.items():
        print(f"median {name}: {cpu:.1f} s CPU ({cpu / args.items * 1e6:.1f} us/item)")
    if "before" in medians:
        same = {json.dumps({k: r[k] for k in ("requests", "duration_s", "items_per_min",
                                               "items_done")}) for rs in plans.values()
                for r in rs}
        print(f"after/before CPU: {medians['after'] / medians['before']:.2f}; "
              f"plans {'identical' if len(same) == 1 else 'DIFFER'} (requests, duration, "
              "items/min, items done)")
    if args.skip_sweep:
        return
    print(f"5x5 sweep (batch size x TPM), {args.sweep_items:,} items a point, 2 processes; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    for name, tree in reversed(trees):
        r = _run(tree, "sweep", args.sweep_items)
        print(f"  {name:>7}: {r['wall_s']:.1f} s wall ({r['points']} points, "
              f"best {r['best']})", flush=True)


if __name__ == "__main__":
    main()
