"""What the Locust processes report: client events to recorder events and Locust statistics,
and the asyncio bridge under gevent's monkey-patching (in a subprocess: importing Locust
patches the interpreter)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from batchclient.events import Event as ClientEvent
from loadtests.run_process import Stat, to_recorder, to_stats

ROOT = Path(__file__).resolve().parents[2]


def test_an_answered_request_becomes_a_req_stat_with_ttft() -> None:
    ev = ClientEvent("request", "semantic_batch:m", 12.0, "ok", status=200,
                     response_time_ms=800.0, ttft_ms=300.0, tokens_in=900, tokens_out=100,
                     items=20, cost_usd=0.001)
    rec = to_recorder(ev, "batched", now=99.0)
    assert rec is not None
    assert (rec.t, rec.outcome, rec.latency_s, rec.ttft_s, rec.items, rec.retry) == (
        12.0, "ok", 0.8, 0.3, 20, False)
    assert to_stats(rec) == [Stat("REQ", "batched", 800.0, 1000), Stat("TTFT", "batched",
                                                                       300.0, 0)]


def test_failures_are_kept_apart_from_requests() -> None:
    limited = to_recorder(ClientEvent("request", "n", 1.0, "retry", status=429,
                                      response_time_ms=5.0, items=1), "a", 1.0)
    timeout = to_recorder(ClientEvent("request", "n", 1.0, "retry", error="timeout"), "a", 1.0)
    watchdog = to_recorder(ClientEvent("request", "n", 1.0, "retry", status=200,
                                       error="watchdog_loop"), "a", 1.0)
    assert limited is not None and timeout is not None and watchdog is not None
    assert (limited.outcome, limited.retry) == ("http_429", True)
    assert timeout.outcome == "timeout" and watchdog.outcome == "cancelled"
    assert [s.request_type for s in to_stats(limited)] == ["429"]
    assert [s.request_type for s in to_stats(timeout)] == ["ERR"]
    assert to_stats(limited)[0].as_kwargs()["exception"] is not None


def test_items_map_to_item_stats_and_cached_ones_get_the_current_time() -> None:
    done = to_recorder(ClientEvent("item", "batched", 5.0, "done", item_id="1"), "batched", 9.0)
    cached = to_recorder(ClientEvent("item", "batched", 0.0, "cached"), "batched", 9.0)
    dead = to_recorder(ClientEvent("item", "batched", 5.0, "dead"), "batched", 9.0)
    assert done is not None and cached is not None and dead is not None
    assert (done.outcome, cached.outcome, cached.t, dead.outcome) == (
        "done", "cached", 9.0, "dead_letter")
    assert to_stats(dead)[0].request_type == "ITEM" and to_stats(dead)[0].exception
    assert to_stats(done)[0].exception is None
    assert to_recorder(ClientEvent("balance", "b", 1.0, "low_balance"), "b", 1.0) is None


def test_bridge_serves_many_greenlets_under_locusts_patching() -> None:
    code = textwrap.dedent("""
        import locust  # monkey-patches, as in a Locust process
        import asyncio, threading, gevent
        from loadtests.bridge import get_bridge

        bridge = get_bridge()
        hub_thread = threading.get_ident()

        async def work(n):
            await asyncio.sleep(0.05)
            return n, threading.get_ident()

        jobs = [gevent.spawn(bridge.run, work(n)) for n in range(300)]
        gevent.joinall(jobs, timeout=20)
        results = [j.value for j in jobs]
        assert [r[0] for r in results] == list(range(300))
        assert len({r[1] for r in results}) == 1 and results[0][1] != hub_thread

        async def boom():
            raise KeyError("x")
        try:
            bridge.run(boom())
        except KeyError:
            print("ok")
        bridge.close()
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
