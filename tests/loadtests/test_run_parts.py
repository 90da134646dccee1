"""The pure parts of ``ratelab run``: load shapes, SLO search, run folder files, progress."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from loadtests.progress import EventTail, Totals, guard_tripped, render
from loadtests.recorder import Event
from loadtests.rundir import (
    EventLog,
    RunSpec,
    SlotClaims,
    attach_items_ok,
    read_run,
    started,
    swarm_started,
)
from loadtests.scenario_model import Stage
from loadtests.shapes import Settle, arrivals, next_gap, read_trace, stage_at
from loadtests.slo import SloSearcher, percentile_ms

STAGES = (Stage("a", 10.0, users=5), Stage("b", 20.0, users=10, rate_per_s=2.0))


def test_stage_at_walks_the_stages_and_ends() -> None:
    at0, at1 = stage_at(STAGES, 0.0), stage_at(STAGES, 10.0)
    assert at0 is not None and at0.stage.name == "a" and at0.start_s == 0.0
    assert at1 is not None and at1.stage.name == "b" and at1.start_s == 10.0
    assert stage_at(STAGES, 30.0) is None


def test_constant_arrivals_are_evenly_spaced() -> None:
    times = [t for t, _ in arrivals((Stage("s", 10.0, rate_per_s=2.0),), "constant", 1.0,
                                    random.Random(0))]
    assert times == pytest.approx([0.5 * k for k in range(1, 20)])


def test_arrivals_skip_a_stage_without_rate_and_scale_by_share() -> None:
    stages = (Stage("quiet", 5.0, rate_per_s=0.0), Stage("busy", 10.0, rate_per_s=4.0))
    got = list(arrivals(stages, "constant", 1.0, random.Random(0), share=0.5))
    assert {name for _, name in got} == {"busy"}
    assert got[0][0] == pytest.approx(5.5) and len(got) == 19


def test_gamma_gaps_have_the_rate_and_burstiness_sets_their_spread() -> None:
    rng = random.Random(1)
    poisson = [next_gap(10.0, "poisson", 1.0, rng) for _ in range(20000)]
    bursty = [next_gap(10.0, "poisson", 0.25, rng) for _ in range(20000)]
    assert statistics.fmean(poisson) == pytest.approx(0.1, rel=0.03)
    assert statistics.fmean(bursty) == pytest.approx(0.1, rel=0.06)
    # coefficient of variation 1/sqrt(shape): 1 for Poisson, 2 for burstiness 0.25
    assert statistics.pstdev(poisson) / 0.1 == pytest.approx(1.0, rel=0.05)
    assert statistics.pstdev(bursty) / 0.1 == pytest.approx(2.0, rel=0.1)
    assert next_gap(0.0, "poisson", 1.0, rng) == float("inf")


def test_trace_rows_are_read_and_sorted(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("t_s,prompt_tokens,output_tokens\n2.5,300,40\n0.5,100,20\n")
    rows = read_trace(trace)
    assert [(r.t_s, r.prompt_tokens, r.max_tokens) for r in rows] == [(0.5, 100, 20),
                                                                      (2.5, 300, 40)]
    # a byte order mark before the header is not part of the first column's name
    trace.write_bytes(b"\xef\xbb\xbft_s,prompt_tokens,max_tokens\n1.0,100,16\n")
    assert [(r.t_s, r.prompt_tokens, r.max_tokens) for r in read_trace(trace)] == [
        (1.0, 100, 16)]


def _search(limit: float, **kw: float) -> SloSearcher:
    """Search against a system whose p95 is ``value * 10`` ms, SLO ``limit`` ms."""
    s = SloSearcher(start=kw.get("start", 1), max=kw.get("max", 1024), threshold_ms=limit)
    while (value := s.next_value()) is not None:
        s.observe(value * 10.0)
    return s


def test_slo_search_doubles_then_bisects_to_the_last_passing_value() -> None:
    s = _search(375.0)
    tried = [p.value for p in s.probes]
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert s.best == 37
    assert all(p.ok == (p.value <= 37) for p in s.probes)


def test_slo_search_stops_at_max_and_when_even_one_fails() -> None:
    assert _search(1e9, max=100).best == 100
    assert _search(5.0).best is None


def test_percentile_ms() -> None:
    assert percentile_ms([0.1, 0.2, 0.3], 50) == pytest.approx(200.0)
    assert percentile_ms([], 95) is None


def test_slot_claims_hand_out_each_slot_once(tmp_path: Path) -> None:
    a, b = SlotClaims(tmp_path / "s.sqlite"), SlotClaims(tmp_path / "s.sqlite")
    assert [a.claim("batch", 3), b.claim("batch", 3), a.claim("batch", 3)] == [0, 1, 2]
    assert b.claim("batch", 3) is None and a.claim("other", 3) == 0
    a.finish("batch", 1)
    assert b.finished("batch") == 1
    assert a.set_once("t0", 5.0) == 5.0 and b.set_once("t0", 9.0) == 5.0


def test_event_log_round_trip_attaches_items_ok(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events-1.jsonl")
    log.event(Event(t=1.0, kind="request", arm="x", outcome="ok", items=3))
    log.event(Event(t=1.0, kind="item", arm="x", outcome="done"))
    log.event(Event(t=1.0, kind="item", arm="x", outcome="done"))
    log.event(Event(t=2.0, kind="request", arm="x", outcome="http_429", items=3))
    log.record("job", {"arm": "x", "pending": 1})
    log.close()
    with (tmp_path / "events-1.jsonl").open("a") as fh:
        fh.write('{"type": "event", "t": 3')  # a line cut short by a killed process
    events, others = read_run(tmp_path)
    assert [e.items_ok for e in events if e.kind == "request"] == [2, None]
    assert others == [{"type": "job", "arm": "x", "pending": 1}]


def test_attach_items_ok_ignores_other_arms() -> None:
    recs = [
        {"type": "event", "t": 1.0, "kind": "request", "arm": "a", "outcome": "ok", "items": 2},
        {"type": "event", "t": 1.0, "kind": "item", "arm": "b", "outcome": "done"},
    ]
    assert attach_items_ok(recs)[0].items_ok == 0


def test_run_spec_round_trip(tmp_path: Path) -> None:
    spec = RunSpec("s.yaml", str(tmp_path), 12.5, 60.0, {"main": "http://127.0.0.1:1/v1"},
                   slots=2)
    spec.write(tmp_path / "run.json")
    assert RunSpec.read(tmp_path / "run.json") == spec


def test_progress_tail_counts_and_guard(tmp_path: Path) -> None:
    path = tmp_path / "events-7.jsonl"
    lines = [{"type": "event", "t": 0.0, "kind": "request", "arm": "x", "outcome": "ok",
              "tokens_in": 900, "tokens_out": 100, "cost_usd": 0.5}]
    lines += [{"type": "event", "t": 60.0, "kind": "item", "arm": "x", "outcome": "done",
               "items": 1}] * 30
    lines += [{"type": "event", "t": 60.0, "kind": "request", "arm": "x",
               "outcome": "http_5xx"}] * 3
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"partial')
    tail = EventTail(tmp_path)
    totals = tail.poll()
    assert (totals.items_done, totals.requests, totals.errors) == (30, 4, 3)
    assert totals.tokens == 1000 and totals.cost_usd == 0.5 and totals.minutes == 1.0
    assert guard_tripped(totals, 0.5, 4) and not guard_tripped(totals, 0.5, 5)
    line = render(totals, 60, 200000)
    assert "items 30/60 (50%)" in line and "30 items/min" in line and "ETA 1m" in line
    assert tail.poll().requests == 4  # nothing new: nothing counted twice
    # the same items over 10 ms of events: no rate yet, rather than 180,000 items/min
    early = Totals(items_done=30, tokens=1000, first_t=5.0, last_t=5.01)
    assert "| 0 items/min | 0/200,000 tok/min |" in render(early, 60, 200000)
    assert "ETA -- (virtual)" in render(early, 60, 200000)


def test_settle_waits_for_a_still_count_or_the_cap() -> None:
    settle = Settle(quiet_s=1.5, max_s=30.0)
    assert not settle.settled(0.0, 100)  # the first look only starts the watch
    assert not settle.settled(1.0, 100)
    assert not settle.settled(2.0, 120)  # requests still landing: the quiet period restarts
    assert not settle.settled(3.0, 120)
    assert settle.settled(3.5, 120)
    stuck = Settle(quiet_s=1.5, max_s=5.0)
    assert [stuck.settled(float(t), t) for t in range(7)] == [False] * 5 + [True, True]


def test_headless_time_starts_at_load_and_ui_time_at_the_swarm(tmp_path: Path) -> None:
    headless = RunSpec("s.yaml", str(tmp_path), 1.0, 60.0, {})
    loaded = started(headless, SlotClaims(tmp_path / "a.sqlite"))
    assert loaded.origin_monotonic > 1.0  # claimed when Locust loaded the run
    ui = RunSpec("s.yaml", str(tmp_path), 1.0, 60.0, {}, headless=False)
    claims = SlotClaims(tmp_path / "b.sqlite")
    assert started(ui, claims) == ui and claims.get("origin") is None  # not yet
    master = swarm_started(ui, claims)  # the UI's Start
    assert claims.get("origin") == master.origin_monotonic > 1.0
    worker = swarm_started(ui, SlotClaims(tmp_path / "b.sqlite"))  # its first spawn, later
    assert worker.origin_monotonic == master.origin_monotonic
    assert started(ui, claims).origin_monotonic == master.origin_monotonic


def test_batch_slots_split_the_key_and_the_in_flight_limit_as_one_client() -> None:
    from batchclient.config import parse_client_config
    from loadtests.run_setup import slot_config

    config = parse_client_config({
        "concurrency": {"limit": 5, "max": 9},
        "providers": [{"name": "a", "base_url": "http://x/v1", "api_key": "k", "tpm": 1000},
                      {"name": "b", "base_url": "http://y/v1", "api_key": "k"}]}, "test")
    assert slot_config(config, 0, 1) is config
    parts = [slot_config(config, slot, 2) for slot in (0, 1)]
    # 5 in flight as 3 + 2, an AIMD ceiling of 9 as 5 + 4; every key halved
    assert [c.concurrency.limit for c in parts] == [3, 2]
    assert [c.concurrency.max for c in parts] == [5, 4]
    assert {p.share for c in parts for p in c.providers} == {0.5}
    assert parts[0].providers[0].limits.tpm == 1000  # the key's whole limit, held by headers
    # more slots than requests in flight: each keeps one
    assert [slot_config(config, s, 8).concurrency.limit for s in range(8)] == [1] * 8
