"""The planner drives the client the live runner builds: same settings, task and bound
inputs for every arm of every shipped scenario, plus the extra keys only plans serve."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loadtests.bound import throughput_bound
from loadtests.planner.assemble import PLAN_URL, PlanError, arm_setup, bound_inputs, task_for
from loadtests.run_setup import arm_task, client_config
from loadtests.run_setup import bound_inputs as live_bound_inputs
from loadtests.scenario import load_scenario, with_overrides

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"
PLANNED = sorted(p.name for p in SCENARIOS.glob("*.yaml"))


@pytest.mark.parametrize("name", PLANNED)
def test_each_arm_is_planned_with_the_live_client(name: str) -> None:
    scenario = load_scenario(SCENARIOS / name)
    for arm in scenario.arms:
        setup = arm_setup(scenario, arm)
        served = {p: f"http://127.0.0.1:9/p/{p}/v1" for p in arm.providers}
        live = client_config(scenario, arm, served, ".")
        assert [p.name for p in setup.config.providers] == list(arm.providers)
        assert tuple(dataclasses.replace(p, base_url=served[p.name])
                     for p in setup.config.providers) == live.providers
        assert dataclasses.replace(setup.config, providers=live.providers) == live
        assert task_for(scenario, arm) == arm_task(scenario, arm)
        assert bound_inputs(scenario, setup) == live_bound_inputs(scenario, arm, live)


def test_an_arm_over_three_keys_sends_to_each_of_them() -> None:
    base = load_scenario(SCENARIOS / "quickstart.yaml")
    scenario = with_overrides(base, {"arms.batched.keys": 3})
    setup = arm_setup(scenario, scenario.arms[0])
    one = arm_setup(base, base.arms[0]).config.providers[0]
    assert [(p.name, p.api_key, p.base_url) for p in setup.config.providers] == [
        ("main", one.api_key, PLAN_URL.format(name="main")),
        ("main-k2", f"{one.api_key}-k2", PLAN_URL.format(name="main-k2")),
        ("main-k3", f"{one.api_key}-k3", PLAN_URL.format(name="main-k3")),
    ]
    assert all(p.limits == one.limits for p in setup.config.providers)
    assert setup.routes == {"main": ("main", one.api_key),
                            "main-k2": ("main", f"{one.api_key}-k2"),
                            "main-k3": ("main", f"{one.api_key}-k3")}
    bound = bound_inputs(scenario, setup)
    single = bound_inputs(base, arm_setup(base, base.arms[0]))
    assert bound is not None and single is not None
    assert throughput_bound(bound).terms["tpm"] == pytest.approx(
        3 * throughput_bound(single).terms["tpm"])


def test_a_key_the_provider_does_not_have_is_refused_naming_it() -> None:
    base = load_scenario(SCENARIOS / "quickstart.yaml")
    scenario = with_overrides(base, {"arms.batched.key": "sk-nobody"})
    with pytest.raises(PlanError, match=r"arms\.batched\.key: 'sk-nobody' is not a key"):
        arm_setup(scenario, scenario.arms[0])


def test_the_client_throttles_each_model_on_its_own_limits() -> None:
    # quickstart's key: gpt-4o-mini overridden to 200,000 TPM and 500 RPM, gpt-4o at its tier's
    scenario = load_scenario(SCENARIOS / "quickstart.yaml")
    live = client_config(scenario, scenario.arms[0], {"main": "http://127.0.0.1:9/v1"}, ".")
    provider = live.providers[0]
    assert (provider.limits_for("gpt-4o-mini").tpm, provider.limits_for("gpt-4o-mini").rpm) == (
        200_000, 500)
    assert provider.limits_for("gpt-4o").tpm == 800_000
