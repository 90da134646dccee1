"""The queue-pattern scenario, shortened: ``ratelab run`` with a gateway in front of the
simulator, in-process and scaled out over Redis with two gateway processes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from loadtests.cli import main as ratelab
from loadtests.scenario import load_scenario
from loadtests.scenario_gateway import GatewaySection, result_mode_for, tier_for
from loadtests.scenario_schema import ScenarioError

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "seed003-queue-pattern.yaml"
USERS = 150
ITEMS = 300
SHORT = ["--no-progress", "--duration-s", "100",
         "--set", f"load.users.callers.stages.0.users={USERS}",
         "--set", "load.users.callers.stages.0.spawn_rate=3",
         "--set", f"gateway.background.items={ITEMS}"]


def _run(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "run"
    status = ratelab(["run", str(SCENARIO), "--out", str(out), *SHORT, *extra])
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert status == 0, (out / "locust.log").read_text()[-3000:]
    return summary


def _check(gw: dict[str, Any], run_dir: Path) -> None:
    """What must hold in either variant."""
    tasks = gw["tasks"]
    # every caller's tasks and the job's items were sent; every accepted task finished
    assert tasks["submitted"] >= 3 * USERS * 0.9 + ITEMS
    assert tasks["by_state"] == {"done": tasks["accepted"]}
    assert tasks["all_done"] is True
    # no user got more than their tier allows, by window count and by the admit_user replay
    limits = gw["limits"]
    assert limits["users_over_limit"] == 0
    assert limits["replay_refusals"] == 0
    assert limits["max_per_60s_by_tier"]["free"]["max_per_60s"] <= 12
    # the free tier's burst of 2 meets every 3-task visit; pro and enterprise never refused
    tiers = gw["refusals_by_tier"]
    assert tiers["free"]["refused"] > 0
    assert tiers["free"]["by_limit"] == {"requests_per_minute": tiers["free"]["refused"]}
    assert tiers["pro"]["refused"] == 0 and tiers["enterprise"]["refused"] == 0
    # both lanes measured; interactive p95 under the lane budget
    ttr = gw["time_to_result_s"]
    assert ttr["background"]["count"] == ITEMS
    assert ttr["interactive"]["count"] == tasks["accepted"] - ITEMS
    assert ttr["interactive"]["p95"] <= gw["interactive_p95_budget_s"]
    assert gw["enqueue_latency_ms"]["count"] == tasks["submitted"]
    # queue depth sampled over the run per lane, written as a time series and plotted
    depth = gw["queue_depth"]
    assert len(depth["t_s"]) > 5 and set(depth["lanes"]) == {"interactive", "background"}
    assert len(depth["lanes"]["background"]) == len(depth["t_s"])
    assert min(depth["t_s"]) >= 0 and depth["t_s"] == sorted(depth["t_s"])
    with (run_dir / "gateway_timeseries.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(depth["t_s"])
    assert (run_dir / "plot-gateway-queue-depth.png").is_file()
    # half the callers poll, half subscribe (SSE); subscribers see their result sooner
    # after the gateway has it (no poll interval to wait out), none had to fall back
    modes = gw["results_by_mode"]
    assert set(modes) == {"poll", "subscribe"}
    assert modes["poll"]["tasks"] + modes["subscribe"]["tasks"] == ttr["interactive"]["count"]
    assert modes["poll"]["users"] > 0.3 * USERS and modes["subscribe"]["users"] > 0.3 * USERS
    assert modes["subscribe"]["fallbacks"] == 0
    assert modes["subscribe"]["notice_s"]["p50"] < modes["poll"]["notice_s"]["p50"]
    # the provider never refused the shared key: the gateway kept under its limit
    assert gw["provider"]["http_429"] == 0
    assert gw["provider"]["within_limit"] is True
    # what the provider charged the gateway's key: the callers' cost, in the headline
    assert gw["provider"]["spent_usd"] > 0
    assert "Through the gateway, the provider charged" in (run_dir / "report.md").read_text()


def test_queue_pattern_in_process(tmp_path: Path) -> None:
    summary = _run(tmp_path)
    gw = summary["gateway"]
    assert gw["backend"] == "sqlite" and gw["processes"] == 1
    _check(gw, tmp_path / "run")
    # the callers' arm counts the refusals as 429s and the finished tasks as ok
    arm = summary["arms"][0]
    refused = sum(t["refused"] for t in gw["refusals_by_tier"].values())
    assert arm["requests"]["http_429"] == refused
    assert arm["requests"]["ok"] == gw["tasks"]["accepted"] - ITEMS
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Gateway" in report


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (.ci/run installs it with apt-get)")
def test_queue_pattern_redis_two_gateways(tmp_path: Path) -> None:
    summary = _run(tmp_path, "--set", "gateway.redis=true", "--set", "gateway.processes=2")
    gw = summary["gateway"]
    assert gw["backend"] == "redis" and gw["processes"] == 2
    _check(gw, tmp_path / "run")


def test_gateway_section_parsed() -> None:
    section = load_scenario(SCENARIO).gateway
    assert isinstance(section, GatewaySection)
    assert section.user_tiers == (("free", 70), ("pro", 25), ("enterprise", 5))
    assert section.background is not None and section.background.tier == "internal"
    assert section.config["workers"] == 32
    assert section.results == (("poll", 1.0), ("subscribe", 1.0))
    modes = [result_mode_for(i, section.results) for i in range(1000)]
    assert abs(modes.count("subscribe") - 500) <= 2
    for tier in ("free", "pro", "enterprise"):   # every tier gets both modes
        mine = [m for i, m in enumerate(modes) if tier_for(i, section.user_tiers) == tier]
        assert 0.4 < mine.count("subscribe") / len(mine) < 0.6


def test_bad_gateway_keys_name_file_and_line(tmp_path: Path) -> None:
    text = SCENARIO.read_text().replace("providers/paid-tier.yaml",
                                        str(SCENARIO.parent / "providers" / "paid-tier.yaml"))
    lines = text.splitlines()
    line = next(i for i, s in enumerate(lines, 1) if s.startswith("  workers: 32"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  workers: 32", "  wrokers: 32")
                   .replace("processes: 1 ", "processes: 2 ")
                   .replace("results: {poll: 1, subscribe: 1}", "results: {poll: 1, sse: 1}"))
    with pytest.raises(ScenarioError) as info:
        load_scenario(bad)
    text_err = str(info.value)
    assert f"{bad}:{line}: gateway.wrokers: unknown key" in text_err
    assert "gateway.processes: several gateway processes share state through Redis" in text_err
    assert "gateway.results.sse: expected one of poll, subscribe, got 'sse'" in text_err
