"""``ratelab run`` end to end: shipped scenarios shortened and time-compressed, the real
simulator, Locust as a subprocess, the run folder and its summary held against the bound."""

from __future__ import annotations

import base64
import itertools
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchclient.policy.job import TOPUP_GRACE_S
from loadtests.rundir import read_run
from loadtests.scenario import load_scenario
from loadtests.shapes import arrivals, read_trace
from tests.loadtests.runs import (
    ROOT,
    SCENARIOS,
    arm,
    assert_completed,
    descendants,
    locust_counts,
    locust_mismatches,
    ratelab_run,
    summary,
    survivors,
)

PLANNER_SCENARIOS = ROOT / "tests" / "loadtests" / "planner" / "scenarios"

CONTRACT = (
    "items.total", "items.done", "items.skipped", "items.dead_letter", "items.lost",
    "requests.total", "requests.ok", "requests.http_429", "requests.http_402",
    "requests.http_5xx", "requests.timeouts", "requests.retries",
    "throughput.items_per_min", "throughput.requests_per_min", "throughput.tokens_per_min",
    "bound.items_per_min", "bound.binding", "bound.efficiency",
    "latency_ms.p50", "latency_ms.p90", "latency_ms.p95", "latency_ms.p99",
    "ttft_ms.p50", "ttft_ms.p90", "ttft_ms.p95", "ttft_ms.p99",
    "cost_usd.total", "cost_usd.per_item",
    "projection.items", "projection.duration_s", "projection.cost_usd",
)


def dig(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "quickstart"
    assert_completed(ratelab_run(SCENARIOS / "quickstart.yaml", out, "--items", "8000"), out)
    return out


def test_quickstart_reaches_the_tpm_bound(quickstart: Path) -> None:
    s = summary(quickstart)
    a = arm(s, "batched")
    assert s["mode"] == "live" and s["partial"] is False and s["ok"] is True
    assert a["items"]["done"] == 8000 and a["items"]["lost"] == 0
    assert a["bound"]["binding"] == "tpm"
    # at least the scenario's 80 %, and never above the physical limit (with slack for the
    # first window's head start)
    assert 0.8 <= a["bound"]["efficiency"] <= 1.1
    assert a["requests"]["rate_429"] <= 0.02
    assert a["items"]["per_request"] == pytest.approx(20.0)


def test_run_folder_is_complete(quickstart: Path) -> None:
    for name in ("summary.json", "report.md", "report.html", "timeseries.csv",
                 "locust_stats.csv", "locust.html", "run.json"):
        assert (quickstart / name).is_file(), name
    s = summary(quickstart)
    assert s["schema"] == "ratelab.summary/1" and s["scenario"] == "quickstart"
    for key in CONTRACT:
        dig(arm(s, "batched"), key)  # KeyError if a contract key is missing
    html = (quickstart / "report.html").read_text()
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(pngs) >= 4
    assert all(base64.b64decode(p).startswith(b"\x89PNG") and len(p) > 1000 for p in pngs)
    # the API key of the simulated provider never reaches the run folder's spec
    assert "sk-ratelab" not in (quickstart / "run.json").read_text()
    # every request and item went through events.request, by request type
    assert locust_mismatches(quickstart, s) == []
    assert locust_counts(quickstart)[("ITEM", "batched:done")][0] > 0


def test_two_processes_do_every_item_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "p2"
    # at 30x rather than 60x: on a loaded machine two processes' late replies at 60x
    # have missed the scenario's items-per-request expectation
    assert_completed(ratelab_run(SCENARIOS / "ci-gate.yaml", out, "--items", "6000",
                                 "--processes", "2", "--set", "time_scale=30"), out)
    done: list[str] = []
    stores = sorted(out.glob("store-gated-*.sqlite"))
    assert len(stores) == 2
    for store in stores:
        with sqlite3.connect(store) as db:
            done += [r[0] for r in db.execute(
                "SELECT item_id FROM item_results WHERE state = 'done'")]
    assert len(done) == 6000 and len(set(done)) == 6000
    s = summary(out)
    a = arm(s, "gated")
    # both workers' statistics reached the master's CSV: nothing counted twice or lost
    assert locust_mismatches(out, s) == []
    assert a["items"]["done"] == 6000 and a["items"]["lost"] == 0
    # requests answered ok carried every item once: nothing was billed twice
    assert a["items"]["per_request"] * a["requests"]["ok"] == pytest.approx(6000, abs=40)
    # each slot's client keeps to its half of the key: they do not race for one window
    assert a["requests"]["rate_429"] < 0.005, a["requests"]


def test_seed001_batching_beats_single_and_naive(tmp_path: Path) -> None:
    out = tmp_path / "s1"
    # at 20x rather than the scenario's 60x: the live pace of its 30 latency-bound batched
    # requests keeps its margin on a loaded machine
    ratelab_run(SCENARIOS / "seed001-semantic-batching.yaml", out, "--items", "600",
                "--set", "time_scale=20")
    s = summary(out)
    naive, single, batch = arm(s, "naive"), arm(s, "single"), arm(s, "semantic_batch")
    for a in (naive, single, batch):
        # naive gives an item up after its retries (a dead letter), the others finish all
        assert a["items"]["done"] + a["items"]["dead_letter"] == 600 and a["items"]["lost"] == 0
        # the article's lesson: the TPM window binds, batched or not
        assert a["bound"]["binding"] == "tpm"
    for a in (naive, single):
        assert a["throughput"]["items_per_min"] <= a["bound"]["items_per_min"] * 1.1
    # 600 items batched fit in the empty first window: they run at the latency pace (30
    # requests, 8 in flight: four waves of lognormal latencies, close to the TPM bound), and
    # the 2,000,000-item projection takes the slower of that pace and the TPM bound (a long
    # job keeps no head start)
    rate, bound = batch["throughput"]["items_per_min"], batch["bound"]["items_per_min"]
    assert rate <= batch["bound"]["terms"]["latency"] * 1.1
    assert batch["projection"]["basis"] == ("bound" if rate > bound else "run")
    projection = batch["projection"]
    assert projection["items_per_min"] == min(rate, bound)
    assert projection["duration_s"] == pytest.approx(projection["items"] / min(rate, bound) * 60)
    # the TPM bound alone puts the job at the article's ~7 h (8-11 h here); a live pace below
    # it only lengthens the projection (a loaded machine slows the 30 latency-bound requests:
    # 13.9 h in one CI run beside other work)
    assert 8 * 3600 <= projection["items"] / bound * 60 <= 11 * 3600
    assert single["items"]["done"] == batch["items"]["done"] == 600
    assert s["ok"] is True, s["checks"]  # every expectation of the scenario holds
    assert batch["tokens"]["per_item"] == pytest.approx(60.05)
    assert naive["requests"]["retry_amplification"] > 2  # the article's 429 storm
    assert naive["requests"]["http_429"] > 0 and single["requests"]["http_429"] == 0
    assert batch["tokens"]["per_item"] < single["tokens"]["per_item"] / 10
    assert batch["throughput"]["items_per_min"] > 5 * single["throughput"]["items_per_min"]
    assert batch["projection"]["cost_usd"] < single["projection"]["cost_usd"] / 5
    # 429s and dead letters are Locust failures of their own types, counted as in the summary
    assert locust_mismatches(out, s) == []
    assert locust_counts(out)[("429", "naive")][0] == naive["requests"]["http_429"] > 0


def test_seed002_lanes_cache_and_stages(tmp_path: Path) -> None:
    out = tmp_path / "s2"
    assert ratelab_run(SCENARIOS / "seed002-lanes-and-cache.yaml", out,
                       "--duration-s", "420") == 0
    s = summary(out)
    bg, chat = arm(s, "background"), arm(s, "chat")
    assert bg["items"]["done"] + bg["items"]["dead_letter"] == 6000
    assert bg["items"]["lost"] == 0
    assert bg["items"]["cached"] > 300  # 40 % duplicates answered without paying twice
    assert bg["requests"]["retry_amplification"] <= 1.2
    assert chat["requests"]["total"] > 50 and chat["latency_ms"]["p95"] <= 20000
    assert chat["requests"]["error_rate"] <= 0.05
    assert [st["name"] for st in s["stages"]][:3] == ["light", "busy", "peak"]
    assert locust_mismatches(out, s) == []  # cached items and chats, kept apart
    # the balance runs dry during "busy": a 402 (one per chat then in flight), then the
    # chat lane waits for the top-up at 300 s rather than stop for good, and serves again
    events = [json.loads(line) for log in out.glob("events-*.jsonl")
              for line in log.read_text().splitlines()]
    # when each chat was sent (its finish minus its latency): one admitted before the 402
    # may finish after it
    chats = [e["t"] - e["latency_s"] for e in events
             if e.get("kind") == "request" and e["arm"] == "chat"]
    refused = [e["t"] for e in events if e.get("kind") == "request" and e["status"] == 402]
    assert chat["requests"]["http_402"] == len(refused) >= 1
    dry = min(refused)
    assert 180 < dry < 300
    # the fuel gauge (the chat client's low_balance_usd of 0.01) warned well before
    assert chat["low_balance"]["t_s"] < dry - 60 and 0 < chat["low_balance"]["balance_usd"] < 0.01
    assert "Arm chat's balance fell below its alert threshold" in (out / "report.md").read_text()
    # none later but those in flight then, or a try as the top-up lands (the parent's poll)
    assert all(t <= dry + 2 or 300 <= t < 300 + TOPUP_GRACE_S for t in refused)
    assert not [sent for sent in chats if dry + 2 <= sent < 300]
    assert len([sent for sent in chats if sent >= 300]) > 100


def test_seed000_sweep_finds_the_knee_at_the_tpm_limit(tmp_path: Path) -> None:
    out = tmp_path / "s0"
    ratelab_run(SCENARIOS / "seed000-concurrency-sweep.yaml", out, "--items", "300",
                "--set", "sweep={arms.single.client.concurrency.limit: [2, 4, 8, 16]}")
    s = summary(out)
    assert [a["name"] for a in s["arms"]] == ["single-2", "single-4", "single-8", "single-16"]
    assert [a["sweep_value"] for a in s["arms"]] == [2.0, 4.0, 8.0, 16.0]
    for a in s["arms"]:
        assert a["items"]["done"] == 300 and a["items"]["lost"] == 0
        assert a["throughput"]["items_per_min"] <= a["bound"]["items_per_min"] * 1.1
    sweep = s["sweep"]
    assert sweep["key"] == "arms.single.client.concurrency.limit"
    rates = [p["items_per_min"] for p in sweep["points"]]
    # latency binds at 2 and 4 in flight (throughput doubles), the TPM window from 8 on:
    # the article's ~270 single-item requests a minute
    assert rates[1] > 1.6 * rates[0]
    assert arm(s, "single-2")["bound"]["binding"] == "latency"
    assert arm(s, "single-16")["bound"]["binding"] == "tpm"
    assert 240 <= rates[3] <= 290 and rates[3] < rates[2] * 1.05
    assert sweep["knee"]["value"] in (4.0, 8.0)
    report = (out / "report.md").read_text()
    assert "## Sweep of arms.single.client.concurrency.limit" in report
    assert "![Sweep curve with the knee](plot-sweep.png)" in report


def test_seed003_failover_and_watchdog_keep_users_served(tmp_path: Path) -> None:
    out = tmp_path / "s3"
    # at 5x, not 10x: TTFT counts each wall millisecond of scheduling delay time_scale-fold,
    # and at 10x a busy host pushed p95 past the scenario's 6 s (its check failed once)
    ratelab_run(SCENARIOS / "seed003-failover-and-streaming.yaml", out, "--duration-s", "160",
                "--set", "time_scale=5",
                "--set", "load.users.crowd.stages=[{name: ramp, duration_s: 80, users: 100,"
                         " spawn_rate: 20}, {name: full, duration_s: 80, users: 250,"
                         " spawn_rate: 50}]",
                "--set", "providers.primary.faults.outages="
                         "[{start_s: 40, end_s: 100, status: 503}]")
    s = summary(out)
    chat = arm(s, "chat")
    r = chat["requests"]
    assert s["partial"] is False and r["total"] > 500
    assert r["http_5xx"] > 0  # the primary's outage was met ...
    assert r["cancelled"] > 0  # ... and the watchdog cut slow or looping streams ...
    assert r["unrecovered"] == 0 and r["retries"] == r["total"] - r["ok"]  # ... all retried ok
    assert chat["ttft_ms"]["p95"] is not None and chat["ttft_ms"]["p50"] < 2000
    assert {c["threshold"]: c["ok"] for c in s["checks"]} == {
        "max_unrecovered_rate": True, "max_retry_amplification": True, "max_ttft_p95_ms": True}
    assert [st["name"] for st in s["stages"]] == ["ramp", "full"]
    assert locust_mismatches(out, s) == []  # 5xx and cancelled streams are ERR failures


def test_per_user_refusals_are_counted_apart_as_planned(tmp_path: Path) -> None:
    # the planner's test_chats_a_per_user_limit_refuses_are_counted_apart_not_as_429s, live:
    # refused chats are neither requests nor 429s, and the counts agree with the plan's
    # (planned: 243 requests, 200 refusals)
    out = tmp_path / "limited"
    assert ratelab_run(PLANNER_SCENARIOS / "fid-fallback-model.yaml", out,
                       "--set", "load.users.crowd.per_user={rpm: 2}",
                       "--set", "load.users.crowd.user_ids=20") == 0
    s = summary(out)
    requests = arm(s, "chat")["requests"]
    assert requests["http_429"] == 0 and 150 <= requests["user_limited"] <= 250
    assert 200 <= requests["total"] <= 260
    assert s["stages"][0]["user_limited"] == requests["user_limited"]
    assert locust_mismatches(out, s) == []


def _with_items_done(out: Path) -> list[Path]:
    """The event logs of a run folder that already hold an item done."""
    return [p for p in out.glob("events-*.jsonl")
            if b'"kind":"item","arm":"batched","outcome":"done"' in p.read_bytes()]


def test_ctrl_c_writes_a_partial_summary_and_leaves_no_orphans(tmp_path: Path) -> None:
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "loadtests.cli", "run", str(SCENARIOS / "quickstart.yaml"),
           "--out", str(out), "--no-progress", "--processes", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # interrupt mid-job: once both workers have logged items done (however slow the start)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_with_items_done(out)) < 2:
        time.sleep(0.2)
    children = descendants(proc.pid)
    assert children, "Locust did not start"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    s = summary(out)
    a = arm(s, "batched")
    assert s["partial"] is True and s["stopped"] == "interrupted"
    assert 0 < a["items"]["done"] < 20000 and a["items"]["lost"] == 0
    assert a["items"]["done"] + a["items"]["pending"] == 20000
    assert survivors(children) == []


def test_bad_scenario_is_refused_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (SCENARIOS / "quickstart.yaml").read_text().replace("max_items: 20", "max_itemz: 20")
    bad.write_text(text.replace("profile: providers/", f"profile: {SCENARIOS}/providers/"))
    proc = subprocess.run([sys.executable, "-m", "loadtests.cli", "run", str(bad), "--out",
                           str(tmp_path / "never")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "bad.yaml:" in proc.stderr and "max_itemz" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_an_unusable_out_folder_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "loadtests.cli", "run",
                           str(SCENARIOS / "quickstart.yaml"), "--out", str(blocker / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"--out {blocker / 'run'}: cannot make the run folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_slo_search_doubles_then_bisects_to_the_gpu_capacity(tmp_path: Path) -> None:
    out = tmp_path / "slo"
    assert ratelab_run(SCENARIOS / "slo-search.yaml", out,
                       "--set", "load.slo_search.start=16",
                       "--set", "load.slo_search.tolerance=0.2",
                       "--set", "load.slo_search.step_duration_s=40") == 0
    s = summary(out)
    slo = s["slo_search"]
    probes = [(p["value"], p["ok"]) for p in slo["probes"]]
    # doubling while the SLO holds, then bisection between the last pass and the first fail
    assert [v for v, _ in probes[:3]] == [16.0, 32.0, 64.0]
    assert probes[0][1] and probes[1][1] and not probes[2][1]  # 64 users queue on 48 slots
    assert probes[3][0] == 48.0 and len(probes) <= 6
    assert slo["best"] is not None and 32 <= slo["best"] < 64
    best = next(p for p in slo["probes"] if p["value"] == slo["best"])
    assert best["measured_ms"] <= 2000 and best["failed"] == 0
    assert slo["goodput_per_s"] == best["goodput_per_s"] > 0
    # every probe is a stage of the summary, its requests counted, none dropped
    stages = {st["name"]: st for st in s["stages"]}
    assert set(stages) == {f"probe-{i}" for i in range(len(probes))}
    assert sum(st["requests"] for st in stages.values()) == arm(s, "chat")["requests"]["total"]
    assert "## SLO search" in (out / "report.md").read_text()


def _cv(values: list[float]) -> float:
    """Coefficient of variation."""
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 / mean


def test_open_loop_constant_poisson_and_trace_replay(tmp_path: Path) -> None:
    path = SCENARIOS / "open-loop-and-trace.yaml"
    out = tmp_path / "open"
    ratelab_run(path, out)
    s = summary(out)
    scenario = load_scenario(path)
    steady_group, _, replay_group = scenario.load.users
    steady, bursty, replay = arm(s, "steady"), arm(s, "bursty"), arm(s, "replay")
    assert s["partial"] is False and s["ok"] is True, s["checks"]
    for a in (steady, bursty, replay):
        assert a["requests"]["ok"] == a["requests"]["total"] > 0
        assert a["ttft_ms"]["p95"] is not None and a["tpot_ms"]["p50"] is not None
    sent: dict[str, list[float]] = {}
    events, _ = read_run(out)
    for e in events:
        if e.kind == "request":
            sent.setdefault(e.arm, []).append(e.t - e.latency_s)
    # constant rate: exactly the scheduled arrivals, evenly spaced, stage by stage
    expected = [t for t, _ in arrivals(steady_group.stages, "constant", 1.0, random.Random(0))]
    assert steady["requests"]["total"] == len(expected) == 119 + 299
    stages = {st["name"]: st for st in s["stages"]}
    assert stages["steady-2rps"]["requests"] == 119 and stages["steady-5rps"]["requests"] == 299
    high = sorted(t for t in sent["steady"] if t >= 61)
    gaps = [b - a for a, b in itertools.pairwise(high)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.2, rel=0.05) and _cv(gaps) < 0.5
    # Poisson with burstiness 0.25: about 4 a second, gaps twice as variable as Poisson's
    assert 280 <= bursty["requests"]["total"] <= 680
    times = sorted(sent["bursty"])
    assert _cv([b - a for a, b in itertools.pairwise(times)]) > 1.4
    # the trace: every row sent at its time with its sizes (replies cut at its max_tokens)
    rows = read_trace(replay_group.trace or "")
    assert replay["requests"]["total"] == len(rows) == 56
    assert replay["tokens"]["output"] == sum(r.max_tokens for r in rows)
    replay_sent = sorted(sent["replay"])
    assert max(abs(a - r.t_s) for a, r in zip(replay_sent, rows, strict=True)) < 1.0
    # the per-stage table: cost per request and latency percentiles, where a step shows
    report = (out / "report.md").read_text()
    assert "## Stages" in report and "| steady-2rps |" in report and "| bursty-4rps |" in report
    for name in ("steady-2rps", "steady-5rps", "bursty-4rps"):
        assert stages[name]["cost_per_request_usd"] > 0 and stages[name]["latency_ms"]["p95"]
    assert locust_mismatches(out, s) == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--items", "-5"], "ratelab run: --items: expected a positive item count, got -5\n"),
    (["--items", "0"], "ratelab run: --items: expected a positive item count, got 0\n"),
    (["--duration-s", "nan"], "ratelab run: --duration-s: expected virtual seconds > 0, "
                              "got nan\n"),
])
def test_bad_flags_are_named_as_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      flags: list[str], message: str) -> None:
    from loadtests.cli import main
    out = tmp_path / "never"
    assert main(["run", str(SCENARIOS / "quickstart.yaml"), "--out", str(out), *flags]) == 2
    assert capsys.readouterr().err == message
    assert not out.exists()


def test_a_second_run_into_a_run_folder_is_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from loadtests.cli import main
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["run", str(SCENARIOS / "quickstart.yaml"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"ratelab run: --out {out}: the folder already holds a run (summary.json); choose "
        "another folder, or pass --overwrite to replace that run\n")
    assert (out / "summary.json").read_text() == "{}"
