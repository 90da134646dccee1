"""Two gateways (separate event loops and threads) sharing one real redis-server: the
provider never sees more than its limit, per-user limits hold across both, a Redis
outage gives 503 then recovery with no lost or double-run task, and a subscriber of one
gateway follows a task the other runs, its streamed tokens included."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import aiohttp

from gateway.server import serve_in_thread
from simulator.model.config import apply_overrides, default_config
from simulator.server import RunningServer
from simulator.server import serve_in_thread as sim_in_thread
from tests.gateway.conftest import gateway_config, sse_events, with_upstream_limits

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


def statuses(sim: RunningServer) -> dict[str, int]:
    stats = next(iter(sim.providers.values())).stats()
    return dict(stats["keys"]["sk-ratelab"]["models"]["gpt-4o-mini"]["requests"])


async def submit(urls: Sequence[str], bodies: Sequence[dict[str, Any]]
                 ) -> list[tuple[int, dict[str, Any]]]:
    """POST each body to /v1/tasks, alternating gateways."""
    out = []
    async with aiohttp.ClientSession() as s:
        for i, body in enumerate(bodies):
            async with s.post(f"{urls[i % len(urls)]}/v1/tasks", json=body) as r:
                out.append((r.status, await r.json()))
    return out


async def wait_all(url: str, ids: Sequence[str], timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Poll until every task is final (through one gateway: the state is shared)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while True:
            done = []
            for task_id in ids:
                async with s.get(f"{url}/v1/tasks/{task_id}") as r:
                    if r.status == 200:
                        data = await r.json()
                        if data["state"] in ("done", "failed", "dead_lettered"):
                            done.append(data)
            if len(done) == len(ids):
                return done
            assert time.monotonic() < deadline, f"{len(done)}/{len(ids)} final"
            await asyncio.sleep(0.1)


def test_two_gateways_share_provider_quota_and_user_limits(redis_server, tmp_path) -> None:
    sim_cfg = apply_overrides(default_config(), rpm=60, time_scale=30, ttft_ms=200, itl_ms=5)
    with sim_in_thread(sim_cfg) as sim:
        cfg = with_upstream_limits(gateway_config(sim, time_scale=30), rpm=60, tpm=None)
        with serve_in_thread(cfg, redis_url=redis_server.url) as a, \
                serve_in_thread(cfg, redis_url=redis_server.url) as b:
            urls = [a.url, b.url]
            bulk = asyncio.run(submit(urls, [{**CHAT, "user": "bench"}] * 90))
            users = asyncio.run(submit(urls, [{**CHAT, "user": "ann"}] * 8
                                       + [{**CHAT, "user": "pat"}] * 14))
            ids = [body["id"] for status, body in bulk + users if status == 202]
            results = asyncio.run(wait_all(a.url, ids))
            calls_a = sum(a.metrics.upstream_calls.values())
            calls_b = sum(b.metrics.upstream_calls.values())
    assert [s for s, _ in bulk] == [202] * 90
    # ann (free: burst 5) and pat (pro: burst 10) across both gateways together
    assert [s for s, _ in users] == [202] * 5 + [429] * 3 + [202] * 10 + [429] * 4
    assert {r["state"] for r in results} == {"done"} and len(results) == 105
    # 105 calls at 60 RPM: the provider never refused one, each task ran exactly once
    assert statuses(sim) == {"200": 105}
    assert calls_a + calls_b == 105 and calls_a > 0 and calls_b > 0


def test_redis_outage_503_then_recovery(redis_server, tmp_path) -> None:
    sim_cfg = apply_overrides(default_config(), time_scale=10, ttft_ms=1000, itl_ms=10)
    with sim_in_thread(sim_cfg) as sim:
        cfg = replace(gateway_config(sim, time_scale=10), workers=4)
        with serve_in_thread(cfg, redis_url=redis_server.url) as gw:
            first = asyncio.run(submit([gw.url], [{**CHAT, "user": "bench"}] * 12))
            time.sleep(0.05)   # workers hold calls in flight (100 ms each)
            redis_server.stop(save=True)
            down = asyncio.run(_while_down(gw.url, first[0][1]["id"]))
            time.sleep(0.3)    # in-flight calls finish while Redis is away
            redis_server.start()
            second = asyncio.run(_until_accepted(gw.url))
            ids = [b["id"] for _, b in first] + [second["id"]]
            results = asyncio.run(wait_all(gw.url, ids))
    assert [s for s, _ in first] == [202] * 12
    (post_status, post_err), (get_status, _), (health_status, _) = down
    assert post_status == 503 and post_err["error"]["code"] == "state_unavailable"
    assert "unreachable" in post_err["error"]["message"]
    assert get_status == 503 and health_status == 503
    assert {r["state"] for r in results} == {"done"} and len(results) == 13
    assert [r["attempts"] for r in results] == [1] * 13
    assert statuses(sim) == {"200": 13}   # nothing lost, nothing run twice


async def _while_down(url: str, task_id: str) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession() as s:
        out = []
        async with s.post(f"{url}/v1/tasks", json={**CHAT, "user": "bench"}) as r:
            out.append((r.status, await r.json()))
        async with s.get(f"{url}/v1/tasks/{task_id}") as r:
            out.append((r.status, await r.text()))
        async with s.get(f"{url}/healthz") as r:
            out.append((r.status, json.loads(await r.text())))
        return out


async def _until_accepted(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.post(f"{url}/v1/tasks", json={**CHAT, "user": "bench"}) as r:
                if r.status == 202:
                    body: dict[str, Any] = await r.json()
                    return body
                assert r.status == 503
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_redis_lease_expiry_recovers_a_dead_gateways_tasks(redis_server, sim_server,
                                                                 gateway) -> None:
    sim = await sim_server(time_scale=10, ttft_ms=1000, itl_ms=1, seed=8)
    cfg = replace(gateway_config(sim, time_scale=10, workers=3), lease_s=3.0)
    first = await gateway(cfg, redis_url=redis_server.url)
    ids = [body["id"] for _, body in await submit([first.url], [{**CHAT, "user": "bench"}] * 6)]
    await asyncio.sleep(0.05)
    await first.close()        # dies with calls in flight: their leases stay behind
    second = await gateway(cfg, redis_url=redis_server.url)
    results = await wait_all(second.url, ids, timeout_s=20)
    assert {r["state"] for r in results} == {"done"}
    rerun = [r for r in results if r["attempts"] == 2]
    assert rerun and sum(second.metrics.upstream_calls.values()) == 6


async def test_a_subscriber_follows_a_task_another_gateway_runs(redis_server, sim_server,
                                                                gateway) -> None:
    sim = await sim_server(time_scale=20, ttft_ms=400, itl_ms=20, seed=9)
    cfg = gateway_config(sim, time_scale=20)
    runner = await gateway(cfg, redis_url=redis_server.url)
    front = await gateway(cfg, redis_url=redis_server.url)
    await front.pool.close()   # the front gateway only takes requests: the runner runs them
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{front.url}/v1/tasks", json={
                **CHAT, "max_tokens": 24, "user": "ann", "stream": True,
                "lane": "interactive"}) as r:
            assert r.status == 202
            task_id = (await r.json())["id"]
        events = await sse_events(s, f"{front.url}/v1/tasks/{task_id}/events")
    states = [e["state"] for k, e in events if k == "state"]
    assert states == ["queued", "running", "done"] and events[-1][0] == "end"
    # tokens are never stored: they reached the front gateway through the relay
    tokens = "".join(e["token"] for k, e in events if k == "token")
    final = next(e for k, e in events if k == "state" and e["state"] == "done")
    assert tokens and final["result"]["choices"][0]["message"]["content"] == tokens
    assert sum(runner.metrics.upstream_calls.values()) == 1
    assert sum(front.metrics.upstream_calls.values()) == 0
