"""What ``ratelab run`` actually runs: ``--set`` overrides, live sweeps and SLO probes.

A live sweep (``sweep:`` with one key under ``arms.<arm>.``) becomes one batch arm per value,
named ``<arm>-<value>``, run one after the other (each on a fresh rolling window), so one
run folder holds the whole curve; the recorder gets each arm's ``sweep_value``. An SLO search
(``load.slo_search``) runs as a series of short probes, each the scenario with the searched
group's stages replaced by one stage at the probed user count or rate (virtual seconds).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loadtests.scenario import load_scenario, parse_scenario, set_dotted, with_overrides
from loadtests.scenario_model import Scenario
from loadtests.scenario_schema import LineMap, Problem, ScenarioError


@dataclass(frozen=True, slots=True)
class LiveSweep:
    """A sweep expanded into arms: the swept key and each expanded arm's value."""

    key: str | None = None
    values: Mapping[str, float] = field(default_factory=dict)


def parse_set(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set`` (VALUE read as a YAML scalar or flow collection)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {key}: value {value!r} is not YAML") from exc


def point_name(arm: str, value: Any) -> str:
    """The expanded arm's name for ``value`` (``single-4``, ``batched-0p5``): no dots."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{arm}-" + re.sub(r"[^A-Za-z0-9_-]", "p", text)


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(v) for v in value]
    return value


def _refuse(scenario: Scenario, key: str, message: str) -> ScenarioError:
    return ScenarioError([Problem(str(scenario.path), 1, key, message)])


def expand_sweep(scenario: Scenario) -> tuple[Scenario, LiveSweep]:
    """The scenario with its one-key arm sweep expanded into arms (unchanged without a sweep)."""
    if not scenario.sweep:
        return scenario, LiveSweep()
    if len(scenario.sweep) > 1:
        raise _refuse(scenario, "sweep", "a live run sweeps one key; `ratelab plan` plans a grid")
    key, values = scenario.sweep[0]
    parts = key.split(".")
    batch = scenario.load.batch
    if len(parts) < 3 or parts[0] != "arms":
        raise _refuse(scenario, f"sweep.{key}",
                      "a live run sweeps an arm's setting (arms.<arm>.<key>); "
                      "`ratelab plan` sweeps any key")
    base_name, sub = parts[1], ".".join(parts[2:])
    if batch is None or base_name not in batch.arms:
        raise _refuse(scenario, f"sweep.{key}", f"arm {base_name!r} is not a batch arm")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise _refuse(scenario, f"sweep.{key}", "a live sweep's values must be numbers")
    doc = _thaw(scenario.raw)
    index = next(i for i, a in enumerate(doc["arms"]) if a["name"] == base_name)
    base = doc["arms"][index]
    arms, swept = [], {}
    for value in values:
        arm = copy.deepcopy(base)
        arm["name"] = point_name(base_name, value)
        set_dotted(arm, sub, value, str(scenario.path))
        arms.append(arm)
        swept[arm["name"]] = float(value)
    doc["arms"][index : index + 1] = arms
    names = [a["name"] for a in arms]
    load_batch = doc["load"]["batch"]
    load_batch["arms"] = [n for a in batch.arms for n in (names if a == base_name else [a])]
    load_batch["order"] = "sequential"  # each point on a fresh rolling window
    per_arm = doc.get("expect", {}).get("arms", {})
    if base_name in per_arm:
        thresholds = per_arm.pop(base_name)
        per_arm.update({n: dict(thresholds) for n in names})
    del doc["sweep"]
    expanded = parse_scenario(doc, LineMap(str(scenario.path), {(): 1}), scenario.path)
    return expanded, LiveSweep(key, swept)


def probe_overrides(scenario: Scenario, value: float, index: int) -> dict[str, Any]:
    """Dotted overrides that turn the scenario into one SLO probe at ``value``."""
    slo = scenario.load.slo_search
    if slo is None:
        raise ValueError("the scenario has no load.slo_search")
    group = next(g for g in scenario.load.users if g.name == slo.users)
    stage: dict[str, Any] = {"name": f"probe-{index}", "duration_s": slo.step_duration_s}
    if slo.variable == "rate" or group.mode != "closed":
        stage["rate_per_s"] = float(value)
    else:
        stage["users"] = int(value)
    return {"duration_s": slo.step_duration_s, f"load.users.{slo.users}.stages": [stage]}


def run_scenario(path: str | Path, duration_s: float | None = None, items: int | None = None,
                 overrides: Mapping[str, Any] | None = None) -> tuple[Scenario, LiveSweep]:
    """The scenario a run (or one probe) executes: loaded, ``--set`` and shortening applied,
    its sweep expanded; ScenarioError names the file and key."""
    from loadtests.run_setup import apply_overrides

    scenario = load_scenario(path)
    if overrides:
        scenario = with_overrides(scenario, dict(overrides))
    scenario = apply_overrides(scenario, duration_s, items)
    return expand_sweep(scenario)


def failing_percentile_ms(values_s: Sequence[float], failed: int, q: float) -> float | None:
    """The ``q`` percentile in ms of successes' durations with each failure counted as
    infinitely slow (None when nothing succeeded or failures alone pass the percentile)."""
    total = len(values_s) + failed
    if not values_s or total == 0:
        return None
    ordered = sorted(values_s) + [math.inf] * failed
    # the nearest-rank percentile, so a failure inside the tail fails the probe
    rank = max(1, math.ceil(q / 100.0 * total))
    value = ordered[rank - 1]
    return None if math.isinf(value) else value * 1000.0
