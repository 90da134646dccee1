"""Workers: lanes (interactive ahead of a background backlog, and FIFO without lanes),
semantic batching of item tasks, restart recovery from the SQLite store."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import yaml

from gateway.config import LaneSettings
from gateway.pacing import PacedCall
from gateway.server import RunningGateway
from gateway.state import StateUnavailable
from simulator.model.config import DEFAULT_PROVIDER_YAML, parse_config
from simulator.model.responder import expected_code
from tests.gateway.conftest import gateway_config
from tests.gateway.test_app import poll

CHAT = {"messages": [{"role": "user", "content": "one more"}], "max_tokens": 8}


async def post_all(gw: RunningGateway, bodies: list[dict[str, Any]]) -> list[str]:
    async with aiohttp.ClientSession() as s:
        ids = []
        for body in bodies:
            async with s.post(f"{gw.url}/v1/tasks", json=body) as r:
                assert r.status == 202, await r.text()
                ids.append((await r.json())["id"])
        return ids


async def finish_order(gw: RunningGateway, ids: list[str]) -> list[float]:
    async with aiohttp.ClientSession() as s:
        for task_id in ids:
            assert (await poll(s, gw, task_id))["state"] == "done"
    times = []
    for task_id in ids:
        task = await gw.store.get(task_id)
        assert task is not None
        times.append(task.updated)
    return times


async def lane_run(sim_server, gateway, tmp_path, lanes: bool) -> tuple[list[float], list[float]]:
    sim = await sim_server(time_scale=10, ttft_ms=500, itl_ms=1, seed=2)
    cfg = gateway_config(sim, time_scale=10, workers=3,
                         lanes=LaneSettings(reserved_workers=1, enabled=lanes))
    gw = await gateway(cfg, db_path=str(tmp_path / f"lanes-{lanes}.db"))
    background = await post_all(gw, [{**CHAT, "user": "bench", "lane": "background"}] * 30)
    interactive = await post_all(gw, [{**CHAT, "user": "bench", "lane": "interactive"}] * 3)
    return await finish_order(gw, background), await finish_order(gw, interactive)


async def test_interactive_served_ahead_of_background_backlog(sim_server, gateway,
                                                              tmp_path) -> None:
    background, interactive = await lane_run(sim_server, gateway, tmp_path, lanes=True)
    # All three interactive tasks finish while at least 20 background tasks still wait.
    later = sorted(background)[-20]
    assert max(interactive) < later


async def test_without_lanes_interactive_waits_behind_the_backlog(sim_server, gateway,
                                                                  tmp_path) -> None:
    background, interactive = await lane_run(sim_server, gateway, tmp_path, lanes=False)
    ahead = sorted(background)[27]   # FIFO: 28 of the 30 queued earlier finish first
    assert min(interactive) > ahead


async def test_item_tasks_packed_with_semantic_batching(sim_server, gateway) -> None:
    provider = yaml.safe_load(DEFAULT_PROVIDER_YAML)
    provider["responder"] = {"kind": "batch_json"}
    sim = await sim_server(parse_config({"providers": [provider], "time_scale": 20, "seed": 9},
                                        "<test>"), ttft_ms=300, itl_ms=1)
    gw = await gateway(gateway_config(sim, time_scale=20, workers=2))
    texts = [f"product number {i} in aisle {i % 7}" for i in range(44)] + ["POISON pill"]
    bodies = [{"user": "bench", "lane": "background", "item": {"id": f"sku-{i}", "text": t}}
              for i, t in enumerate(texts)]
    async with aiohttp.ClientSession() as s:
        ids = await asyncio.gather(*[_post(s, gw, b) for b in bodies])
        results = [await poll(s, gw, task_id) for task_id in ids]
    codes = tuple("ABCDEFGH")
    for i, (text, res) in enumerate(zip(texts[:-1], results[:-1], strict=True)):
        assert res["state"] == "done"
        assert res["result"] == {"id": f"sku-{i}", "code": expected_code(text, codes),
                                 "label": expected_code(text, codes)}
    assert results[-1]["state"] == "dead_lettered"
    assert results[-1]["error"] == {
        "type": "upstream_error", "code": "item_never_answered",
        "message": "no reply answered the item in 3 tries (the last: left out of the reply)"}
    calls = sum(gw.metrics.upstream_calls.values())
    assert calls <= 20 < len(texts)  # packed: far fewer calls than items


async def test_item_tasks_against_a_prose_provider_say_why(sim_server, gateway) -> None:
    """A provider that answers in prose (the simulator's default) answers no item: each is
    dead-lettered after ``max_misses`` calls, and its error says what the replies were
    (prose runs past the tight max_tokens of a batch)."""
    sim = await sim_server(time_scale=20, seed=9)
    gw = await gateway(gateway_config(sim, time_scale=20, workers=1))
    async with aiohttp.ClientSession() as s:
        task_id = await _post(s, gw, {"user": "bench", "item": {"id": "a", "text": "hello"}})
        result = await poll(s, gw, task_id)
    assert result["state"] == "dead_lettered"
    assert result["error"]["message"] == (
        "no reply answered the item in 3 tries (the last: reply cut at max_tokens)")
    assert gw.metrics.upstream_calls == {200: 3}


async def _post(s: aiohttp.ClientSession, gw: RunningGateway, body: dict[str, Any]) -> str:
    async with s.post(f"{gw.url}/v1/tasks", json=body) as r:
        assert r.status == 202, await r.text()
        task_id: str = (await r.json())["id"]
        return task_id


async def test_restart_loses_nothing_and_pays_nothing_twice(sim_server, gateway,
                                                            tmp_path) -> None:
    sim = await sim_server(time_scale=10, ttft_ms=1000, itl_ms=1, seed=4)
    cfg = replace(gateway_config(sim, time_scale=10, workers=3,
                                 lanes=LaneSettings(reserved_workers=1)))
    db = str(tmp_path / "restart.db")
    first = await gateway(cfg, db_path=db)
    ids = await post_all(first, [{**CHAT, "user": "bench"}] * 10)
    async with aiohttp.ClientSession() as s:
        await poll(s, first, ids[0])
    await asyncio.sleep(0.01)
    before = {t.id: t for t in [await first.store.get(i) for i in ids] if t is not None}
    done_before = {i: t.result for i, t in before.items() if t.state == "done"}
    running = [i for i, t in before.items() if t.state == "running"]
    await first.close()                       # stop with tasks in flight
    assert done_before and running
    second = await gateway(cfg, db_path=db)
    assert getattr(second.store, "recovered", None) == len(running)
    async with aiohttp.ClientSession() as s:
        after = {i: await poll(s, second, i) for i in ids}
    assert {a["state"] for a in after.values()} == {"done"}
    for task_id, result in done_before.items():   # finished work is not paid again
        assert after[task_id]["result"] == result and after[task_id]["attempts"] == 1
    for task_id in running:                        # in flight at the stop: run again
        assert after[task_id]["attempts"] == 2
    assert sum(second.metrics.upstream_calls.values()) == 10 - len(done_before)


async def test_upstream_errors_fail_or_dead_letter(sim_server, gateway) -> None:
    provider = yaml.safe_load(DEFAULT_PROVIDER_YAML)
    provider["faults"] = {"error_500_rate": 1.0}
    sim = await sim_server(parse_config({"providers": [provider], "time_scale": 50, "seed": 3},
                                        "<test>"), ttft_ms=10, itl_ms=1)
    gw = await gateway(gateway_config(sim, time_scale=50, max_attempts=3))
    async with aiohttp.ClientSession() as s:
        task_id = await _post(s, gw, {**CHAT, "user": "bench"})
        dead = await poll(s, gw, task_id)
        async with s.post(f"{gw.url}/v1/chat/completions",
                          json={**CHAT, "user": "bench"}) as r:
            passthrough = (r.status, await r.json())
    assert dead["state"] == "dead_lettered" and dead["attempts"] == 1
    assert dead["error"]["code"] == "retries_exhausted"
    assert dead["error"]["message"].startswith(
        "gave up after 3 calls to the upstreams (max_attempts): HTTP 500")
    assert passthrough[0] == 500 and passthrough[1]["error"]["code"] == "retries_exhausted"
    assert gw.metrics.upstream_calls == {500: 6}


async def test_provider_refusal_fails_the_task(sim_server, gateway) -> None:
    sim = await sim_server(time_scale=20)
    gw = await gateway(gateway_config(sim))
    async with aiohttp.ClientSession() as s:
        body = {"user": "bench", "messages": CHAT["messages"], "max_tokens": 100_000}
        failed = await poll(s, gw, await _post(s, gw, body))
    assert failed["state"] == "failed" and failed["upstream_status"] == 400
    assert failed["error"]["type"] == "invalid_request_error"


class _WindowAwayOnCancel:
    """A provider window whose step blocks and turns its cancellation into an outage, as a
    cancel that races a Redis timeout comes back on Python 3.11."""

    def __init__(self) -> None:
        self.steps = 0

    async def acquire(self, now: float, call: PacedCall) -> float:
        self.steps += 1
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise StateUnavailable("Redis unreachable: Timeout reading from socket") from None
        return 0.0


async def test_close_stops_a_worker_whose_cancel_came_back_as_an_outage(sim_server,
                                                                         gateway) -> None:
    sim = await sim_server(ttft_ms=50, itl_ms=1)
    gw = await gateway(gateway_config(sim, workers=1))
    window = _WindowAwayOnCancel()
    gw.pool.windows = {name: window for name in gw.pool.windows}
    async with aiohttp.ClientSession() as s:
        await _post(s, gw, {**CHAT, "user": "bench"})
    async with asyncio.timeout(10):
        while window.steps == 0:
            await asyncio.sleep(0.01)
        await gw.close()  # the worker retries in _route: it must see close() and stop
    assert window.steps == 1 and gw.pool._tasks == []


def _item_sim_config(seed: int) -> Any:
    provider = yaml.safe_load(DEFAULT_PROVIDER_YAML)
    provider["responder"] = {"kind": "batch_json"}
    return parse_config({"providers": [provider], "time_scale": 20, "seed": seed}, "<test>")


def _items(texts: list[str], tag: str) -> list[dict[str, Any]]:
    return [{"user": "bench", "lane": "background", "item": {"id": f"{tag}-{i}", "text": t}}
            for i, t in enumerate(texts)]


async def _results(gw: RunningGateway, ids: list[str]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        return [await poll(s, gw, task_id) for task_id in ids]


async def test_an_item_answered_once_is_never_paid_for_again(sim_server, gateway,
                                                             tmp_path) -> None:
    """Items whose normalised text was answered before are answered from the item cache:
    no call, the same code, ``cached`` in the result; the cache outlives a restart (it is
    in the gateway's SQLite file)."""
    sim = await sim_server(_item_sim_config(11), ttft_ms=50, itl_ms=1)
    cfg = gateway_config(sim, time_scale=20, workers=2)
    db = str(tmp_path / "cache.db")
    gw = await gateway(cfg, db_path=db)
    texts = [f"shelf {i} holds tins of beans" for i in range(12)]
    first = await _results(gw, await post_all(gw, _items(texts, "a")))
    calls = sum(gw.metrics.upstream_calls.values())
    assert {r["state"] for r in first} == {"done"} and calls >= 1
    again = [f"  SHELF {i} holds   tins of Beans " for i in range(12)]   # same, normalised
    second = await _results(gw, await post_all(gw, _items(again, "b")))
    assert sum(gw.metrics.upstream_calls.values()) == calls   # not one more call
    codes = tuple("ABCDEFGH")
    assert [r["result"] for r in second] == [
        {"id": f"b-{i}", "code": expected_code(t, codes), "label": expected_code(t, codes),
         "cached": True} for i, t in enumerate(texts)]
    assert gw.metrics.snapshot(None)["item_cache_hits"] == 12
    await gw.close()
    reopened = await gateway(cfg, db_path=db)
    third = await _results(reopened, await post_all(reopened, _items(texts[:3], "c")))
    assert all(r["result"]["cached"] for r in third)
    assert sum(reopened.metrics.upstream_calls.values()) == 0
    # switched off, the same items are sent again
    off = await gateway(replace(cfg, batching=replace(cfg.batching, cache=False)),
                        db_path=str(tmp_path / "off.db"))
    await _results(off, await post_all(off, _items(texts, "d")))
    await _results(off, await post_all(off, _items(texts, "e")))
    assert off.metrics.snapshot(None)["item_cache_hits"] == 0


async def test_the_item_cache_is_shared_through_redis(redis_server, sim_server,
                                                      gateway) -> None:
    sim = await sim_server(_item_sim_config(12), ttft_ms=50, itl_ms=1)
    cfg = gateway_config(sim, time_scale=20, workers=2)
    one = await gateway(cfg, redis_url=redis_server.url)
    other = await gateway(cfg, redis_url=redis_server.url)
    await other.pool.close()   # the first gateway answers the items...
    texts = [f"crate {i} of oranges" for i in range(8)]
    await _results(one, await post_all(one, _items(texts, "a")))
    await one.pool.close()     # ...and the second one answers their duplicates
    other.pool.start()
    dupes = await _results(other, await post_all(other, _items(texts, "b")))
    assert all(r["result"]["cached"] for r in dupes)
    assert sum(other.metrics.upstream_calls.values()) == 0
    assert other.metrics.cache_hits == 8


async def test_a_list_of_items_is_one_request_of_its_user(sim_server, gateway) -> None:
    """``items`` in one POST: one request against the user's RPM (a free-tier user's 5 a
    minute would otherwise let 5 items in), every item its own task, answered packed; a
    bad item refuses the whole list, naming it, and stores nothing."""
    sim = await sim_server(_item_sim_config(13), ttft_ms=50, itl_ms=1)
    gw = await gateway(gateway_config(sim, time_scale=20, workers=2))
    texts = [f"parcel {i} for the north depot" for i in range(60)]
    items = [{"id": f"p{i}", "text": t} for i, t in enumerate(texts)]
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/tasks", json={"user": "ann", "items": items}) as r:
            assert r.status == 202, await r.text()
            listed = await r.json()
        assert listed["object"] == "list" and len(listed["data"]) == 60
        results = [await poll(s, gw, t["id"]) for t in listed["data"]]
        codes = tuple("ABCDEFGH")
        assert [r["result"]["code"] for r in results] == [expected_code(t, codes)
                                                          for t in texts]
        bad = [*items[:3], {"id": "p 3", "text": "spaced id"}, *items[4:]]
        async with s.post(f"{gw.url}/v1/tasks", json={"user": "ann", "items": bad}) as r:
            assert r.status == 400
            error = (await r.json())["error"]
        assert error["param"] == "items[3]" and error["code"] == "invalid_item"
        assert error["message"].startswith("items[3]: 'item' must be")
        for body, param in (({"user": "ann", "items": []}, "items"),
                            ({"user": "ann", "items": items, "item": items[0]}, "items")):
            async with s.post(f"{gw.url}/v1/tasks", json=body) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == param
        # more tokens than the free tier's day (5,000): refused whole, never to pass
        many = [{"id": f"q{i}", "text": f"crate {i} of tinned tomatoes"} for i in range(400)]
        async with s.post(f"{gw.url}/v1/tasks", json={"user": "ann", "items": many}) as r:
            assert r.status == 429 and r.headers["x-should-retry"] == "false"
    assert gw.metrics.accepted == {"background": 60}   # the refused lists stored nothing
    assert sum(gw.metrics.upstream_calls.values()) <= 6   # packed, 20 a call
