"""The CI gate's noise: run ``scenarios/ci-gate.yaml`` N times and print each gated figure's
spread ((max - min) / mean) and the gate's verdict per run; the issue asks under 2%.

    .venv/bin/python benchmarks/bench_ci_gate.py [--runs 5] [--out runs/gate-spread]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "scenarios" / "baselines" / "ci-gate.json"


def main() -> int:
    """Run the gate scenario repeatedly; print the figures, their spread and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="runs/gate-spread")
    args = parser.parse_args()
    figures = list(json.loads(BASELINE.read_text())["figures"])
    values: dict[str, list[float]] = {f: [] for f in figures}
    for n in range(args.runs):
        out = Path(args.out) / f"run-{n + 1}"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "loadtests.cli", "run", "scenarios/ci-gate.yaml",
                        "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True)
        wall = time.monotonic() - started
        gate = subprocess.run([sys.executable, "-m", "loadtests.cli", "gate",
                               str(out / "summary.json"), "--baseline", str(BASELINE)],
                              cwd=ROOT, capture_output=True)
        summary = json.loads((out / "summary.json").read_text())
        arms = {a["name"]: a for a in summary["arms"]}
        row = []
        for name in figures:
            arm, _, path = name.partition(".")
            node = arms[arm]
            for part in path.split("."):
                node = node[part]
            values[name].append(float(node))
            row.append(f"{name.split('.', 1)[1]}={float(node):.6g}")
        whole = arms["gated"]["throughput"]["items_per_min"]
        print(f"run {n + 1}: wall {wall:.1f} s, gate exit {gate.returncode}, "
              + ", ".join(row) + f" (whole-job items/min {whole:.1f})")
    for name, vs in values.items():
        mean = sum(vs) / len(vs)
        spread = (max(vs) - min(vs)) / mean if mean else 0.0
        print(f"{name}: min {min(vs):.6g} max {max(vs):.6g} spread {spread:.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
