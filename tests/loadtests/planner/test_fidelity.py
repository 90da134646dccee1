"""The plan of a scenario against a compressed live run of it: the client's asyncio runner
over HTTP against the real simulator on a loopback port, built from the same assembly."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from batchclient.runner import JobResult, Runner
from batchclient.store import SqliteJobStore
from batchclient.transport import AiohttpTransport
from loadtests.planner.assemble import arm_setup, items, simulator_config, task_for
from loadtests.planner.compare import relative_error
from loadtests.planner.sim import plan_scenario
from loadtests.scenario import load_scenario
from simulator.server import serve_in_thread

HERE = Path(__file__).parent / "scenarios"


def live_run(path: Path, tmp_path: Path) -> JobResult:
    scenario = load_scenario(path)
    arm = scenario.arms[0]
    setup = arm_setup(scenario, arm)
    with serve_in_thread(simulator_config(scenario)) as server:
        providers = tuple(
            dataclasses.replace(p, base_url=server.base_url(setup.routes[p.name][0]))
            for p in setup.config.providers)
        config = dataclasses.replace(setup.config, providers=providers)
        store = SqliteJobStore(str(tmp_path / "job.sqlite"))
        store.import_items(items(scenario))

        async def go() -> JobResult:
            async with AiohttpTransport(providers, config.stream) as transport:
                runner = Runner(task_for(scenario, arm), config, transport, store)
                return await runner.run()

        try:
            return asyncio.run(go())
        finally:
            store.close()


@pytest.mark.parametrize("name", ["fid-batch", "fid-single", "fid-rpm"])
def test_plan_within_5_percent_of_live(name: str, tmp_path: Path) -> None:
    path = HERE / f"{name}.yaml"
    live = live_run(path, tmp_path)
    plan = plan_scenario(load_scenario(path)).summary()["arms"][0]
    assert live.done == plan["items"]["done"] == live.total
    measured = {
        "items_per_min": live.done / live.elapsed_s * 60.0,
        "requests_per_min": live.requests / live.elapsed_s * 60.0,
        "duration_s": live.elapsed_s,
        "cost_usd": live.cost_usd,
    }
    predicted = {
        "items_per_min": plan["throughput"]["items_per_min"],
        "requests_per_min": plan["throughput"]["requests_per_min"],
        "duration_s": plan["duration_s"],
        "cost_usd": plan["cost_usd"]["total"],
    }
    errors = {k: relative_error(predicted[k], measured[k]) for k in measured}
    print(name, measured, predicted, errors)
    for key, error in errors.items():
        assert error is not None and abs(error) <= 0.05, (key, predicted[key], measured[key])
    assert abs(plan["requests"]["http_429"] - live.rate_limited) <= max(2, 0.05 * live.requests)
