"""What ``ratelab run`` runs: ``--set`` values, a sweep expanded into arms, SLO probes."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.run_plans import (
    expand_sweep,
    failing_percentile_ms,
    parse_set,
    point_name,
    probe_overrides,
    run_scenario,
)
from loadtests.scenario import ScenarioError, with_overrides

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def test_parse_set_reads_yaml_values() -> None:
    assert parse_set("time_scale=60") == ("time_scale", 60)
    assert parse_set("arms.a.client.throttle={enabled: false}") == (
        "arms.a.client.throttle", {"enabled": False})
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_set("time_scale")


def test_point_names_hold_no_dots() -> None:
    assert point_name("single", 4) == "single-4"
    assert point_name("batched", 0.5) == "batched-0p5"


def test_sweep_expands_into_one_batch_arm_per_value() -> None:
    scenario, sweep = run_scenario(SCENARIOS / "seed000-concurrency-sweep.yaml")
    names = [f"single-{v}" for v in (1, 2, 4, 8, 16, 32)]
    assert [a.name for a in scenario.arms] == names
    assert scenario.load.batch is not None and scenario.load.batch.arms == tuple(names)
    assert scenario.load.batch.order == "sequential" and scenario.sweep == ()
    assert [a.client["concurrency"]["limit"] for a in scenario.arms] == [1, 2, 4, 8, 16, 32]
    assert all(a.client["throttle"]["enabled"] is False for a in scenario.arms)
    assert sweep.key == "arms.single.client.concurrency.limit"
    assert dict(sweep.values) == {n: float(v) for n, v in zip(names, (1, 2, 4, 8, 16, 32),
                                                                strict=True)}


def test_sweep_copies_the_swept_arms_thresholds() -> None:
    base = with_overrides(run_scenario(SCENARIOS / "quickstart.yaml")[0], {
        "expect": {"arms": {"batched": {"min_efficiency": 0.5}}},
        "sweep": {"arms.batched.client.batch.max_items": [10, 20]}})
    scenario, _ = expand_sweep(base)
    assert scenario.expect.for_arm("batched-10")["min_efficiency"] == 0.5
    assert scenario.arm("batched-20").client["batch"]["max_items"] == 20


@pytest.mark.parametrize(("sweep", "message"), [
    ({"workload.items": [10, 20]}, "sweeps an arm's setting"),
    ({"arms.batched.client.batch.max_items": [10], "seed": [1, 2]}, "one key"),
    ({"arms.batched.strategy": ["single", "naive"]}, "must be numbers"),
])
def test_live_sweeps_refused_with_the_key(sweep: dict[str, list[object]], message: str) -> None:
    base = with_overrides(run_scenario(SCENARIOS / "quickstart.yaml")[0], {"sweep": sweep})
    with pytest.raises(ScenarioError, match=message):
        expand_sweep(base)


def test_probe_overrides_replace_the_searched_groups_stages() -> None:
    scenario, _ = run_scenario(SCENARIOS / "slo-search.yaml")
    over = probe_overrides(scenario, 8, 3)
    probe = with_overrides(scenario, over)
    group = next(g for g in probe.load.users if g.name == "chat-users")
    assert [(s.name, s.users, s.duration_s) for s in group.stages] == [("probe-3", 8, 60.0)]
    assert probe.duration_s == 60.0


def test_failures_count_as_infinitely_slow_in_the_percentile() -> None:
    fast = [0.1] * 19
    assert failing_percentile_ms([*fast, 0.5], 0, 95) == pytest.approx(100.0)
    assert failing_percentile_ms(fast, 1, 95) == pytest.approx(100.0)  # the 20th is the failure
    assert failing_percentile_ms(fast, 2, 95) is None  # failures reach the 95th percentile
    assert failing_percentile_ms([], 0, 95) is None
