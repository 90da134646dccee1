"""The planner end to end: seeded exact figures, the run folder, sweeps and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchclient.config import BatchSettings
from batchclient.policy.packing import definition_tokens, response_format
from loadtests.cli import main
from loadtests.planner.offline import offline_alternative
from loadtests.planner.sim import PlanOptions, plan_scenario
from loadtests.planner.sweep import SweepError, parse_sweep, sweep_points
from loadtests.run_setup import arm_task
from loadtests.scenario import load_scenario, with_overrides

HERE = Path(__file__).parent / "scenarios"
SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"


def test_plan_is_seeded_and_reproducible() -> None:
    scenario = load_scenario(HERE / "fid-batch.yaml")
    a = plan_scenario(scenario, PlanOptions(items=2000)).summary()["arms"][0]
    b = plan_scenario(scenario, PlanOptions(items=2000)).summary()["arms"][0]
    assert a == b
    assert a["items"]["done"] == 2000
    assert a["items"]["lost"] == 0
    assert a["requests"]["total"] == 100
    assert a["bound"]["binding"] in ("tpm", "latency")


def test_json_mode_is_planned_as_the_provider_answers_it() -> None:
    # the provider model wraps the array ({"results": [...]}) and the client reads it whole
    scenario = load_scenario(HERE / "fid-batch.yaml")
    plain = plan_scenario(scenario, PlanOptions(items=2000)).summary()["arms"][0]
    asked = plan_scenario(with_overrides(scenario, {"arms.batched.client.batch.json_mode": True}),
                          PlanOptions(items=2000)).summary()["arms"][0]
    assert asked["items"] == plain["items"] and asked["items"]["done"] == 2000
    assert asked["requests"] == plain["requests"] and asked["requests"]["total"] == 100
    assert asked["tokens"]["input"] == plain["tokens"]["input"]
    assert asked["tokens"]["output"] - plain["tokens"]["output"] == 3 * 100


def test_json_schema_is_planned_as_the_provider_answers_it() -> None:
    # the provider model fills the schema's answers and bills its text; the bound counts it
    scenario = load_scenario(HERE / "fid-batch.yaml")
    plain = plan_scenario(scenario, PlanOptions(items=2000)).summary()["arms"][0]
    held_scenario = with_overrides(scenario, {"arms.batched.client.batch.json_schema": True})
    held = plan_scenario(held_scenario, PlanOptions(items=2000)).summary()["arms"][0]
    assert held["items"] == plain["items"] and held["items"]["done"] == 2000
    assert held["requests"] == plain["requests"] and held["requests"]["total"] == 100
    task = arm_task(held_scenario, held_scenario.arms[0])
    schema = definition_tokens(response_format(task, BatchSettings(json_schema=True)))
    assert held["tokens"]["input"] - plain["tokens"]["input"] == schema * 100
    assert held["tokens"]["output"] - plain["tokens"]["output"] == 3 * 100
    assert held["bound"]["items_per_min"] < plain["bound"]["items_per_min"]


def test_a_balance_that_runs_dry_waits_for_its_top_up() -> None:
    # seed002: the chats spend the balance during "busy"; the lane waits for the top-up
    # at 300 s (no refusal recorded as a request, no user spinning on it) and goes on
    result = plan_scenario(load_scenario(SCENARIOS / "seed002-lanes-and-cache.yaml"))
    chat = next(a for a in result.summary()["arms"] if a["name"] == "chat")
    assert chat["requests"]["http_402"] == 1 and chat["requests"]["http_429"] == 0
    rows = [r for r in result.recorder.timeseries_rows() if r["arm"] == "chat"]
    # the 402 is the last error before the top-up: nothing is sent after it until then
    dry = max(r["t_s"] for r in rows if r["t_s"] < 300 and r["errors"])
    assert 180 < dry < 290
    # the fuel gauge (the chat client's low_balance_usd of 0.01) warned well before
    alert = chat["low_balance"]
    assert alert["t_s"] < dry - 60 and 0 < alert["balance_usd"] < 0.01
    assert sum(r["requests"] for r in rows if dry + 1 <= r["t_s"] < 300) == 0
    assert sum(r["requests"] for r in rows if 300 <= r["t_s"] < 310) > 10
    assert result.requests < 5000  # 2,152 in all (it was 9.7 million refusals)


def test_separate_input_and_output_limits_are_throttled_apart() -> None:
    # an Anthropic-like key with an input and an output limit and no total TPM: the client
    # holds each (it sent 85% of its requests into 429s when it knew of neither)
    arm = plan_scenario(load_scenario(HERE / "fid-split.yaml")).summary()["arms"][0]
    assert arm["items"]["done"] == 6000 and arm["requests"]["http_429"] == 0
    bound = arm["bound"]
    assert bound["binding"] == "tpm" and set(bound["terms"]) >= {"input_tpm", "output_tpm"}
    assert min(bound["terms"], key=bound["terms"].get) == "input_tpm"
    assert 0.95 <= bound["steady_efficiency"] <= 1.0


def test_a_daily_token_cap_is_named_as_the_binding_limit(tmp_path: Path) -> None:
    # 6,000 items at 1,100 tokens a 20-item request: three days of a 100,000-token cap;
    # the report names the cap and does not ask for more TPM
    out = tmp_path / "day"
    assert main(["plan", str(HERE / "fid-day.yaml"), "--out", str(out)]) == 0
    arm = json.loads((out / "summary.json").read_text())["arms"][0]
    assert arm["items"]["done"] == 6000
    assert arm["bound"]["binding"] == "tokens_per_day"
    assert arm["projection"]["needed_tpm"] is None
    assert arm["projection"]["other_limit"]["binding"] == "tokens_per_day"
    # 2,000,000 items at the daily average: about 1,100 days
    assert 1000 < arm["projection"]["duration_s"] / 86400 < 1200
    report = (out / "report.md").read_text()
    assert "the **tokens_per_day** limit binds" in report and "daily token cap" in report


def test_failover_to_a_backup_asked_for_another_model() -> None:
    # the primary is down from 60 s to 180 s: the chats fail over to the backup, asked for
    # gpt-4o (the arm's models), and none is lost; the same plan without it stays on
    # gpt-4o-mini, 16 times cheaper a token
    scenario = load_scenario(HERE / "fid-fallback-model.yaml")
    assert dict(scenario.arms[0].models) == {"backup": "gpt-4o"}
    other = plan_scenario(scenario).summary()["arms"][0]
    same = plan_scenario(with_overrides(scenario, {"arms.chat.models": {}})).summary()["arms"][0]
    for arm in (other, same):
        assert arm["requests"]["unrecovered"] == 0 and arm["requests"]["total"] > 800
    assert other["cost_usd"]["total"] > 3 * same["cost_usd"]["total"]


def test_chats_a_per_user_limit_refuses_are_counted_apart_not_as_429s() -> None:
    # 20 users asking every 5 s under 2 requests a minute each: many chats are refused by
    # the user's own bucket before any request (the user then waits for its bucket and
    # thinks); the provider, far from its limits, never answers 429, and the refusals are
    # no requests (test_run.py holds the live run to the same figures)
    scenario = with_overrides(load_scenario(HERE / "fid-fallback-model.yaml"),
                              {"load.users.crowd.per_user": {"rpm": 2},
                               "load.users.crowd.user_ids": 20})
    summary = plan_scenario(scenario).summary()
    requests = summary["arms"][0]["requests"]
    assert requests["http_429"] == 0 and 150 <= requests["user_limited"] <= 250
    assert sum(st["user_limited"] for st in summary["stages"]) == requests["user_limited"]
    # 20 users x 2 a minute over 5 minutes, each bucket full at the start: 243 sent
    assert 200 <= requests["total"] <= 260


def test_batching_beats_single_by_the_token_ratio() -> None:
    batch = plan_scenario(load_scenario(HERE / "fid-batch.yaml")).summary()["arms"][0]
    single = plan_scenario(load_scenario(HERE / "fid-single.yaml")).summary()["arms"][0]
    ratio = single["tokens"]["per_item"] / batch["tokens"]["per_item"]
    assert 10 < ratio < 14
    assert single["bound"]["binding"] == "tpm"
    assert single["bound"]["efficiency"] > 0.9


def test_cli_writes_the_run_folder_with_a_sweep(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    status = main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "600", "--out", str(out),
                   "--sweep", "arms.batched.client.batch.max_items=5,10", "--processes", "1"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "plan"
    assert summary["schema"] == "ratelab.summary/1"
    assert [r["values"]["arms.batched.client.batch.max_items"]
            for r in summary["grid"]["rows"]] == [5, 10]
    assert summary["grid"]["best"]["batched"]["point"] == "max_items=10"
    assert "## Planner" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "<img" in page
    # the sweep is one table, its header row first, the best point in bold
    sweep = page[page.index("<h3>Sweep</h3>"):]
    table = sweep[:sweep.index("</table>")]
    assert table.count("<table>") == 1 and table.count("<tr>") == 3
    assert "<th>point</th><th>arm</th><th>items/min</th>" in table
    assert "<td>max_items=10 <b>best</b></td>" in table
    printed = capsys.readouterr().out
    assert "sweep of 2 points:" in printed
    assert "\nmax_items=10 (best)  batched" in printed
    assert "best for batched: max_items=10 (" in printed


@pytest.mark.parametrize("flag, named", [
    ("arms.batched.client.batch.nope=3", "nope"),
    ("arms.nosuch.keys=2", "nosuch"),
    ("arms.batched.keys=many", "arms.batched.keys"),
])
def test_bad_sweeps_are_refused_naming_the_key(flag: str, named: str) -> None:
    scenario = load_scenario(HERE / "fid-batch.yaml")
    with pytest.raises(SweepError) as err:
        sweep_points(scenario, [parse_sweep(flag)])
    assert named in str(err.value)


def test_cli_refuses_a_bad_sweep_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(HERE / "fid-batch.yaml"), "--sweep", "bogus"]) == 2
    assert "KEY=V1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--processes", "0", "--sweep", "arms.batched.keys=1,2"],
     "--processes: expected an integer >= 1, got 0"),
    (["--tolerance", "-0.1"], "--tolerance: expected a relative error >= 0, got -0.1"),
    (["--tolerance", "nan"], "--tolerance: expected a relative error >= 0, got nan"),
    (["--capacity", "--sample-items", "0"], "--sample-items: expected an integer >= 1, got 0"),
    (["--capacity", "--sample-span-s", "nan"],
     "--sample-span-s: expected virtual seconds > 0, got nan"),
    (["--capacity", "--sample-span-s", "-5"],
     "--sample-span-s: expected virtual seconds > 0, got -5"),
    (["--capacity", "--target-users", "0"], "--target-users: expected an integer >= 1, got 0"),
])
def test_cli_refuses_numeric_flags_out_of_range_before_planning(
        flags: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan"
    assert main(["plan", str(HERE / "fid-batch.yaml"), "--out", str(out), *flags]) == 2
    assert capsys.readouterr().err == f"ratelab plan: {message}\n"
    assert not out.exists()


def test_cli_refuses_an_unusable_out_folder_before_planning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--out", str(blocker / "plan")]) == 2
    assert f"--out {blocker / 'plan'}: cannot make the run folder" in capsys.readouterr().err


def test_an_out_folder_holding_a_run_is_refused_unless_overwritten(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second run into a folder would read the first one's files back as its own: it is
    refused, naming the way out; --overwrite replaces a run, and never a folder that is
    not a run's."""
    out = tmp_path / "plan"
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "200", "--out", str(out)]) == 0
    first = (out / "summary.json").read_text()
    capsys.readouterr()
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "400", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"ratelab plan: --out {out}: the folder already holds a run (summary.json and 9 other "
        "files); choose another folder, or pass --overwrite to replace that run\n")
    assert (out / "summary.json").read_text() == first
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "400", "--out", str(out),
                 "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["arms"][0]["items"]["total"] == 400
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        assert main(["plan", str(HERE / "fid-rpm.yaml"), "--out", str(other), *flags]) == 2
    err = capsys.readouterr().err
    assert "the folder already holds files (todo.txt); choose another folder\n" in err
    assert "--overwrite replaces only a run folder" in err
    assert (other / "todo.txt").read_text() == "keep me"
    # the folder of the run --compare reads is never the one written (the summary dressed
    # as a live run's)
    live = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**live, "mode": "live"}))
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--compare", str(out), "--out", str(out),
                 "--overwrite"]) == 2
    assert "the folder of the run --compare reads" in capsys.readouterr().err
    assert (out / "summary.json").exists()


def test_compare_refuses_a_plan_folder_or_another_scenarios_run_before_planning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a plan's folder of fid-rpm, then the same summary dressed as a live run
    plan = tmp_path / "plan"
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "200", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--compare", str(plan),
                 "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (f"ratelab plan: --compare {plan}: a plan folder, not a "
                                       "live run (ratelab run writes one)\n")
    summary = json.loads((plan / "summary.json").read_text())
    live = tmp_path / "live"
    live.mkdir()
    (live / "summary.json").write_text(json.dumps({**summary, "mode": "live"}))
    assert main(["plan", str(HERE / "fid-batch.yaml"), "--compare", str(live),
                 "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (f"ratelab plan: --compare {live}: a run of scenario "
                                       "'fid-rpm', not 'fid-batch'\n")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # the right scenario, but none of its arms in the run: no figure to hold, not a pass
    arms = [{**arm, "name": "renamed"} for arm in summary["arms"]]
    (live / "summary.json").write_text(json.dumps({**summary, "mode": "live", "arms": arms}))
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "200", "--compare", str(live),
                 "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.endswith(f"ratelab plan: --compare {live}: no arm of the "
                                            "run is an arm of this plan\n")


def _as_live(summary: dict[str, object], folder: Path, time_scale: float) -> Path:
    """A plan's summary written into ``folder`` as a live run at ``time_scale``."""
    folder.mkdir(exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({**summary, "mode": "live",
                                                     "time_scale": time_scale}))
    return folder


def test_compare_names_the_figures_outside_the_tolerance(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the plan's own summary as a live run compressed 60-fold, 10% slower
    plan = tmp_path / "plan"
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "200", "--out", str(plan)]) == 0
    summary = json.loads((plan / "summary.json").read_text())
    arm = summary["arms"][0]
    arm["throughput"]["items_per_min"] /= 1.1
    live = _as_live(summary, tmp_path / "live", time_scale=60)
    capsys.readouterr()
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "200", "--compare", str(live),
                 "--out", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err == (
        f"ratelab plan: 1 figure outside the 5% tolerance: {arm['name']} items/min +10.0% "
        "(the live run was compressed 60-fold: each round trip's real milliseconds count that "
        "many times over, which makes it a few percent slower than the plan; "
        "docs/planner.md, Fidelity)\n")
    assert main(["plan", str(HERE / "fid-rpm.yaml"), "--items", "200", "--compare", str(live),
                 "--tolerance", "0.11", "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""


def test_compare_holds_the_steady_rate_when_both_sides_have_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # fid-single spans several limit windows: a steady rate on both sides, compared; the
    # live side 8% slower over the whole run but steady, as a compressed live run is
    plan = tmp_path / "plan"
    assert main(["plan", str(HERE / "fid-single.yaml"), "--items", "2000",
                 "--out", str(plan)]) == 0
    summary = json.loads((plan / "summary.json").read_text())
    arm = summary["arms"][0]
    assert arm["throughput"]["steady_items_per_min"] == 262.0
    arm["throughput"]["items_per_min"] /= 1.08
    live = _as_live(summary, tmp_path / "live", time_scale=30)
    capsys.readouterr()
    assert main(["plan", str(HERE / "fid-single.yaml"), "--items", "2000", "--compare",
                 str(live), "--out", str(tmp_path / "a")]) == 1
    out, err = capsys.readouterr()
    assert "single             steady/min" in out
    assert err.startswith("ratelab plan: 1 figure outside the 5% tolerance: single items/min "
                          "+8.0% (the live run was compressed 30-fold")
    assert err.endswith("; the steady rate agrees: single +0.0%\n")
    # a steady rate off by more than the tolerance fails too
    arm["throughput"]["items_per_min"] *= 1.08
    arm["throughput"]["steady_items_per_min"] = 262.0 / 1.1
    _as_live(summary, live, time_scale=1)
    assert main(["plan", str(HERE / "fid-single.yaml"), "--items", "2000", "--compare",
                 str(live), "--out", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err == (
        "ratelab plan: 1 figure outside the 5% tolerance: single steady/min +10.0%\n")


def test_a_run_cut_short_is_planned_for_as_long_as_its_arm_ran(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A live run stopped by its duration_s is compared with a plan stopped when the live
    arm stopped (its span), not at duration_s: the live run's first virtual seconds go to
    starting Locust, which the plan does not spend."""
    plan = tmp_path / "plan"
    assert main(["plan", str(HERE / "fid-single.yaml"), "--items", "2000",
                 "--out", str(plan)]) == 0
    whole = json.loads((plan / "summary.json").read_text())
    # the first half of that job, as a live run cut there would report it
    arm = whole["arms"][0]
    cut = round(arm["duration_s"] / 2)
    done = round(arm["throughput"]["items_per_min"] * cut / 60)
    arm["duration_s"] = cut
    arm["items"] = {**arm["items"], "done": done, "pending": 2000 - done}
    live = _as_live({**whole, "partial": True}, tmp_path / "live", time_scale=20)
    capsys.readouterr()
    main(["plan", str(HERE / "fid-single.yaml"), "--items", "2000", "--compare", str(live),
          "--out", str(tmp_path / "a")])
    rows = {line.split()[2]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("single ") and len(line.split()) >= 5}
    assert float(rows["s"][3]) == pytest.approx(cut, abs=1.0)   # the live arm's span


def test_a_job_that_stops_at_its_spend_cap_is_planned_and_says_why() -> None:
    # the very same engine in virtual time: the cap holds, the summary says why it stopped
    scenario = with_overrides(load_scenario(HERE / "fid-batch.yaml"),
                              {"arms.batched.client.spend_cap_usd": 0.002})
    result = plan_scenario(scenario, PlanOptions(items=2000))
    arm = result.summary()["arms"][0]
    assert result.status == {"batched": 6}
    assert arm["job_stop"]["exit_status"] == 6
    assert arm["job_stop"]["reason"].startswith("spend cap USD 0.002 reached: USD ")
    assert 0 < arm["cost_usd"]["total"] <= 0.002
    assert arm["items"]["done"] + arm["items"]["pending"] == 2000
    assert arm["items"]["pending"] > 0 and arm["items"]["lost"] == 0
    uncapped = plan_scenario(load_scenario(HERE / "fid-batch.yaml"), PlanOptions(items=2000))
    assert uncapped.summary()["arms"][0]["job_stop"] is None


def test_offline_alternative_halves_the_price() -> None:
    arm = {"items": {"done_per_request": 20.0},
           "projection": {"items": 2_000_000, "duration_s": 7 * 3600.0, "cost_usd": 40.0,
                          "deadline_s": 4 * 3600.0}}
    alt = offline_alternative(arm)
    assert alt is not None
    assert alt["cost_usd"] == 20.0
    assert alt["requests"] == 100_000
    assert alt["files"] == 2
    assert alt["pick"] == "online"


def test_failover_scenario_retries_chats_on_the_backup_and_users_see_no_failure() -> None:
    shipped = Path(__file__).parents[3] / "scenarios" / "seed003-failover-and-streaming.yaml"
    summary = plan_scenario(load_scenario(shipped), PlanOptions(stop_at_s=300)).summary()
    chat = summary["arms"][0]["requests"]
    # the primary's outage fails requests, each sent again (to the backup once the
    # breaker opens): retries are counted, and what users saw fail stays under 1%
    assert chat["http_5xx"] > 0 and chat["retries"] > 0
    assert chat["retry_amplification"] > 1.0
    assert chat["unrecovered_rate"] <= 0.01
    assert chat["total"] == chat["ok"] + chat["http_429"] + chat["http_5xx"] + chat["http_4xx"] \
        + chat["timeouts"] + chat["errors"] + chat["cancelled"] + chat["http_402"]


def test_a_trace_is_replayed_row_by_row_with_its_sizes() -> None:
    from loadtests.shapes import read_trace

    scenario = load_scenario(SCENARIOS / "open-loop-and-trace.yaml")
    group = next(g for g in scenario.load.users if g.mode == "trace")
    assert group.trace is not None
    rows = [r for r in read_trace(group.trace) if r.t_s < scenario.duration_s]
    summary = plan_scenario(scenario, PlanOptions()).summary()
    replay = next(a for a in summary["arms"] if a["name"] == group.arm)
    # one request per row sent in the run, each prompt and reply of the row's sizes (the
    # responder's 40-token replies are cut at every row's max_tokens)
    assert replay["requests"]["total"] == replay["requests"]["ok"] == len(rows)
    assert replay["tokens"]["input"] == sum(r.prompt_tokens for r in rows)
    assert replay["tokens"]["output"] == sum(r.max_tokens for r in rows)
