"""The event recorder: exact counts, rates in virtual time, time series, projection, stages."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from loadtests.bound import BoundInputs
from loadtests.recorder import ArmInfo, Event, Recorder, outcome_for_status, write_timeseries_csv
from reports.summary import contract_problems

BOUND = BoundInputs(700, 20, 15, 5, 1.0, tpm=200_000, rpm=500, client_concurrency=8)


def events() -> list[Event]:
    """60 virtual seconds: 30 ok requests of 20 items, 3 429s, one 5xx retried, a dead item."""
    out = []
    for n in range(30):
        t = 2.0 * (n + 1)
        out.append(
            Event(
                t,
                "request",
                "a",
                "ok",
                200,
                latency_s=1.0,
                ttft_s=0.25,
                tokens_in=1000,
                tokens_out=100,
                items=20,
                items_ok=19 if n == 0 else 20,
                cost_usd=0.001,
                stage="s1" if t <= 30 else "s2",
            )
        )
        out.append(Event(t, "item", "a", "done", items=19 if n == 0 else 20))
    for t in (10.5, 20.5, 30.5):
        out.append(Event(t, "request", "a", "http_429", 429, latency_s=0.01, items=20))
    out.append(Event(40.5, "request", "a", "http_5xx", 503, latency_s=0.5, items=20))
    out.append(
        Event(
            41.0,
            "request",
            "a",
            "ok",
            200,
            latency_s=0.5,
            tokens_in=1000,
            tokens_out=100,
            items=1,
            cost_usd=0.001,
            retry=True,
        )
    )
    out.append(Event(41.0, "item", "a", "dead_letter"))
    return out


def recorder() -> Recorder:
    arm = ArmInfo(
        "a",
        "semantic_batch",
        600,
        BOUND,
        thresholds={"min_items_per_min": 600.0, "max_429_rate": 0.05},
    )
    return Recorder(
        "t", "live", [arm], bucket_s=1.0, project_items=1_000_000, project_deadline_s=3600.0
    )


def test_summary_figures_are_exact() -> None:
    rec = recorder()
    rec.add_many(events())
    s = rec.summary()
    assert contract_problems(s) == []
    a = s["arms"][0]
    assert a["duration_s"] == 59.0  # first start 1.0 to last end 60.0
    assert a["items"] == {
        "total": 600,
        "done": 599,
        "cached": 0,
        "skipped": 0,
        "dead_letter": 1,
        "lost": 0,
        "pending": 0,
        "requeued": 0,
        "per_request": 681 / 35,
        "done_per_request": 599 / 35,
        "survival": 600 / 601,
    }
    r = a["requests"]
    assert (r["total"], r["ok"], r["http_429"], r["http_5xx"], r["retries"]) == (35, 31, 3, 1, 1)
    assert r["rate_429"] == 3 / 35 and r["error_rate"] == 1 / 35
    assert r["retry_amplification"] == 35 / 34
    assert a["throughput"]["items_per_min"] == pytest.approx(599 * 60 / 59)
    assert a["throughput"]["tokens_per_min"] == pytest.approx(31 * 1100 * 60 / 59)
    assert a["tokens"]["per_item"] == 31 * 1100 / 599
    assert a["bound"]["binding"] == "tpm"
    assert a["bound"]["efficiency"] == pytest.approx(599 * 60 / 59 / 3636.3636, rel=1e-6)
    assert a["latency_ms"]["p50"] == 1000.0 and a["ttft_ms"]["p95"] == 250.0
    assert a["cost_usd"]["total"] == pytest.approx(0.031)
    assert a["projection"]["duration_s"] == pytest.approx(1_000_000 / 599 * 59)
    assert a["projection"]["needed_keys"] == 28  # 27.4 h against a 1 h deadline
    # 16,667 items/min needed; 8 in flight at 1 s of latency stop at 9,600, and RPM 500 at
    # 10,000: more TPM alone cannot meet the deadline (nor more RPM), more keys can
    assert a["projection"]["needed_tpm"] is None and a["projection"]["needed_rpm"] is None
    assert a["projection"]["other_limit"] == {"binding": "latency", "items_per_min": 9600.0}
    assert [c["ok"] for c in s["checks"]] == [True, False]  # 609 items/min; 429 rate 8.6%


def test_more_tpm_is_the_answer_only_while_no_other_limit_stops_short() -> None:
    inputs = BoundInputs(700, 20, 15, 5, 1.0, tpm=200_000, rpm=5000, client_concurrency=64)
    rec = Recorder("t", "live", [ArmInfo("a", "semantic_batch", 600, inputs)], bucket_s=1.0,
                   project_items=1_000_000, project_deadline_s=3600.0)
    rec.add_many(events())
    p = rec.summary()["arms"][0]["projection"]
    # 64 in flight reach 76,800 items/min and RPM 5,000 100,000: TPM binds to the end
    assert p["needed_tpm"] == pytest.approx(200_000 * 1_000_000 / 599 * 59 / 3600)
    assert p["needed_rpm"] is None  # TPM stops short of what more RPM alone would need
    assert p["other_limit"] is None


def test_order_does_not_matter() -> None:
    shuffled = events()
    random.Random(1).shuffle(shuffled)
    a, b = recorder(), recorder()
    a.add_many(events())
    b.add_many(shuffled)
    assert a.summary() == b.summary() and a.timeseries_rows() == b.timeseries_rows()


def test_timeseries_rolling_window_and_csv(tmp_path: Path) -> None:
    rec = recorder()
    rec.add_many(events())
    rows = rec.timeseries_rows()
    assert rows[0]["t_s"] == 3.0 and rows[-1]["t_s"] == 61.0  # bucket ends, virtual s
    by_t = {r["t_s"]: r for r in rows}
    assert by_t[3.0]["items_done"] == 19 and by_t[3.0]["tokens_window_60s"] == 1100
    assert by_t[61.0]["tokens_window_60s"] == 31 * 1100
    assert by_t[11.0]["http_429"] == 1 and by_t[41.0]["errors"] == 1
    assert by_t[61.0]["cost_usd_cum"] == pytest.approx(0.031)
    assert by_t[61.0]["tpm_limit"] == 200_000
    write_timeseries_csv(rows, tmp_path / "ts.csv")
    with (tmp_path / "ts.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def test_lost_pending_partial_and_stages() -> None:
    rec = recorder()
    rec.add_many(events()[:20])
    s = rec.summary(partial=True, pending={"a": 300})
    assert s["partial"] is True
    items = s["arms"][0]["items"]
    assert (items["done"], items["pending"], items["lost"]) == (199, 300, 101)
    full = recorder()
    full.add_many(events())
    stages = full.summary()["stages"]
    assert [st["name"] for st in stages] == ["s1", "s2"]
    assert [st["requests"] for st in stages] == [15, 15]
    assert stages[0]["cost_per_request_usd"] == pytest.approx(0.001)


def test_refusals_and_status_mapping() -> None:
    rec = recorder()
    with pytest.raises(KeyError):
        rec.add(Event(1.0, "request", "zz", "ok"))
    with pytest.raises(ValueError):
        rec.add(Event(1.0, "request", "a", "teapot"))
    with pytest.raises(ValueError):
        Recorder("t", "dry", [])
    assert [outcome_for_status(s) for s in (200, 429, 402, 503, 400, 0)] == [
        "ok",
        "http_429",
        "http_402",
        "http_5xx",
        "http_4xx",
        "error",
    ]
    assert outcome_for_status(0, timed_out=True) == "timeout"


def test_sweep_and_knee() -> None:
    arms = [ArmInfo(f"c{c}", "single", 100, BOUND, sweep_value=float(c)) for c in (1, 2, 4, 8)]
    rec = Recorder("t", "plan", arms, meta={"sweep_key": "concurrency"})
    rates = {1: 60, 2: 120, 4: 240, 8: 245}
    for c, per_min in rates.items():
        for n in range(per_min):
            t = (n + 1) * 60.0 / per_min
            rec.add(Event(t, "request", f"c{c}", "ok", latency_s=0.0, items=1))
            rec.add(Event(t, "item", f"c{c}", "done"))
    sweep = rec.summary()["sweep"]
    assert [p["value"] for p in sweep["points"]] == [1, 2, 4, 8]
    assert sweep["knee"]["value"] == 4.0 and sweep["key"] == "concurrency"


def test_steady_rate_counts_whole_windows_after_the_first_by_dispatch_time() -> None:
    from loadtests.recorder_summary import steady_rate

    # a burst of 30 requests in the first 10 s, then one request every 2 s until t=250 s
    dispatched = [(0.3 * n, 20, 1000) for n in range(30)]
    dispatched += [(10.0 + 2.0 * n, 10, 500) for n in range(121)]
    steady = steady_rate(*zip(*dispatched, strict=True))
    # windows [60,120) and [120,180): [180,240) ends before the last dispatch (250) too
    assert steady["windows"] == 3 and steady["start_s"] == 60.0 and steady["end_s"] == 240.0
    assert steady["items_per_min"] == 300.0  # 30 requests of 10 items per window
    assert steady["tokens_per_min"] == 15000.0
    # no whole second window in the first 30 requests
    assert steady_rate(*zip(*dispatched[:30], strict=True))["items_per_min"] is None
    assert steady_rate([], [], [])["windows"] == 0


def test_summary_holds_the_steady_rate_beside_the_whole_run_rate() -> None:
    rec = Recorder("s", "live", [ArmInfo("a", "semantic_batch", 4000, BOUND)])
    for n in range(200):
        t = 1.0 * n + 1.0
        rec.add(Event(t, "request", "a", "ok", 200, latency_s=1.0, tokens_in=1100, items=20))
        rec.add(Event(t, "item", "a", "done", items=20))
    arm = rec.summary()["arms"][0]
    # dispatches from 0 to 199 s: windows [60,120) and [120,180) hold 60 requests each
    assert arm["throughput"]["steady"]["windows"] == 2
    assert arm["throughput"]["steady_items_per_min"] == 1200.0
    assert arm["throughput"]["steady_tokens_per_min"] == 66000.0
    assert arm["bound"]["steady_efficiency"] == pytest.approx(
        1200.0 / arm["bound"]["items_per_min"]
    )


def test_a_job_stop_is_the_first_non_zero_status_but_an_interruption() -> None:
    rec = recorder()
    rec.job_stopped("a", 0, "")
    rec.job_stopped("a", 130, "interrupted")  # the run's own stop, told by "stopped"
    assert rec.stop_of("a") is None
    rec.job_stopped("a", 3, "402 insufficient balance")
    rec.job_stopped("a", 6, "spend cap USD 1 reached")
    assert rec.stop_of("a") == (3, "402 insufficient balance")
    assert rec.summary()["arms"][0]["job_stop"] == {"exit_status": 3,
                                                    "reason": "402 insufficient balance"}
