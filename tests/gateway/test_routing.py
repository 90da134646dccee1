"""Several upstreams: the router (pure, the batching client's failover and breakers) and the
gateway end to end with the first upstream in an outage, down, or rate limited."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest
import yaml

from batchclient.config import BreakerSettings
from batchclient.configreader import ConfigError
from batchclient.policy.classify import Classified, Verdict
from gateway.config import Upstream, default_config, parse_config
from gateway.pacing import PacedCall
from gateway.requests import BadRequest, parse_task
from gateway.routing import PROBE_WAIT_S, Router
from simulator.model.config import DEFAULT_PROVIDER_YAML
from simulator.model.config import parse_config as sim_parse
from tests.gateway.conftest import free_port, gateway_config
from tests.gateway.test_app import poll
from tests.gateway.test_shared import statuses
from tests.gateway.test_worker import CHAT, post_all

# a small interactive call asking whether the window would admit it now
PROBE = PacedCall(-1, "gpt-4o-mini", 5, 5, 5, graduated=False)

FAIL = Classified(Verdict.RETRY, "HTTP 503", server_error=True)
OK = Classified(Verdict.OK, "ok")


def ups(*names: str, models: tuple[str, ...] = ("m",), failover: bool = False
        ) -> tuple[Upstream, ...]:
    return tuple(Upstream(n, f"http://{n}/v1", "k", models, failover_on_429=failover)
                 for n in names)


def test_failover_order_and_breaker() -> None:
    router = Router(ups("a", "b"), BreakerSettings(failures=3, cooldown_s=10.0))
    assert router.choose(0.0, "m") == "a"
    assert router.choose(0.0, "m", avoid=("a",)) == "b"      # a just failed this call
    assert router.choose(0.0, "x") is None                   # nobody serves model x
    for t in (1.0, 2.0):
        router.on_dispatch(t, "a")
        router.on_answer(t, "a", FAIL, 503)
    assert router.choose(2.0, "m") == "a"                    # two failures: still closed
    router.on_answer(3.0, "a", FAIL, 0)                      # a refused connection counts
    assert router.state(3.0) == {"a": "open", "b": "closed"}
    assert router.choose(3.0, "m") == "b"
    assert router.wait_s(3.0) == pytest.approx(10.0)
    # after the cooldown one probe goes back to a; a success closes its breaker
    assert router.choose(13.0, "m") == "a"
    router.on_dispatch(13.0, "a")
    assert router.choose(13.5, "m") == "b"                   # the probe is out
    router.on_answer(14.0, "a", OK, 200)
    assert router.state(14.0)["a"] == "closed" and router.choose(14.0, "m") == "a"


def test_breaker_changes_are_announced_and_applied_elsewhere() -> None:
    here = Router(ups("a", "b"), BreakerSettings(failures=2, cooldown_s=10.0))
    there = Router(ups("a", "b"), BreakerSettings(failures=2, cooldown_s=10.0))
    told: list[tuple[str, float | None]] = []
    here.on_change = lambda name, at: told.append((name, at))
    here.on_answer(1.0, "a", FAIL, 503)
    assert told == []                                        # one failure: still closed
    here.on_answer(2.0, "a", FAIL, 503)
    assert told == [("a", 2.0)]
    for name, at in told:
        there.apply_remote(2.5, name, at)
    assert there.state(2.5) == {"a": "open", "b": "closed"} and there.choose(2.5, "m") == "b"
    assert there.wait_s(2.5) == pytest.approx(9.5)           # the opener's cooldown
    there.apply_remote(3.0, "a", 1.0)                        # an older opening changes nothing
    assert there.wait_s(3.0) == pytest.approx(9.0)
    there.apply_remote(3.0, "gone", 3.0)                     # an upstream it does not have
    here.on_dispatch(12.0, "a")                              # the probe succeeds: closed
    here.on_answer(12.5, "a", OK, 200)
    assert told[-1] == ("a", None)
    there.apply_remote(12.5, "a", None)
    assert there.state(12.5)["a"] == "closed" and there.choose(12.5, "m") == "a"


def test_every_breaker_open_means_wait() -> None:
    router = Router(ups("a", "b"), BreakerSettings(failures=1, cooldown_s=5.0))
    router.on_answer(0.0, "a", FAIL, 500)
    router.on_answer(1.0, "b", FAIL, 500)
    assert router.choose(1.0, "m") is None
    assert router.wait_s(1.0) == pytest.approx(4.0)          # a reopens first
    assert router.wait_s(10.0) == PROBE_WAIT_S               # both may probe: none to wait


def test_rate_limited_upstream_hands_on_only_with_failover_on_429() -> None:
    plain = Router(ups("a", "b"), BreakerSettings())
    plain.limited(0.0, "a", 30.0)
    assert plain.choose(1.0, "m") == "a"                     # waits for its own key
    spill = Router(ups("a", "b", failover=True), BreakerSettings())
    spill.limited(0.0, "a", 30.0)
    assert spill.choose(1.0, "m") == "b"
    assert spill.choose(31.0, "m") == "a"                    # back once a's wait is over


def test_models_route_to_the_upstreams_that_serve_them() -> None:
    router = Router((*ups("a", models=("small",)), *ups("b", models=("small", "big"))),
                    BreakerSettings())
    assert router.choose(0.0, "small") == "a" and router.choose(0.0, "big") == "b"


def test_config_breaker_failover_and_unique_names() -> None:
    first = {"name": "a", "base_url": "http://a/v1", "api_key": "k",
             "failover_on_429": True, "models": ["m1"]}
    base = {"upstreams": [first, {"name": "b", "base_url": "http://b/v1", "api_key": "k",
                                  "models": ["m1", "m2"]}],
            "breaker": {"failures": 2, "cooldown_s": 7}}
    cfg = parse_config(base, "gw.yaml")
    assert cfg.breaker == BreakerSettings(2, 7.0)
    assert [u.failover_on_429 for u in cfg.upstreams] == [True, False]
    assert cfg.models == ("m1", "m2") and cfg.upstream.name == "a"
    twice = {**base, "upstreams": [first, first]}
    with pytest.raises(ConfigError, match=r"gw.yaml: upstreams\[1\].name: .* got 'a' again"):
        parse_config(twice, "gw.yaml")
    with pytest.raises(ConfigError, match=r"breaker.failures: expected an integer >= 1, got 0"):
        parse_config({**base, "breaker": {"failures": 0}}, "gw.yaml")


def _outage_provider() -> dict[str, object]:
    provider = yaml.safe_load(DEFAULT_PROVIDER_YAML)
    provider["faults"] = {"outages": [{"start_s": 0, "end_s": 1e9, "status": 503}]}
    return provider


async def test_first_upstream_outage_tasks_complete_on_the_second(sim_server, gateway) -> None:
    down = await sim_server(sim_parse({"providers": [_outage_provider()], "time_scale": 20,
                                       "seed": 1}, "<test>"), ttft_ms=10, itl_ms=1)
    good = await sim_server(time_scale=20, ttft_ms=50, itl_ms=1, seed=2)
    base = gateway_config(down, time_scale=20, workers=4,
                          breaker=BreakerSettings(failures=3, cooldown_s=600.0))
    second = replace(base.upstream, name="second", base_url=good.base_url())
    cfg = replace(base, upstreams=(replace(base.upstream, name="first"), second))
    gw = await gateway(cfg)
    ids = await post_all(gw, [{**CHAT, "user": "bench"}] * 12
                         + [{**CHAT, "user": "bench", "stream": True, "lane": "interactive"}] * 3)
    async with aiohttp.ClientSession() as s:
        results = [await poll(s, gw, task_id) for task_id in ids]
    assert {r["state"] for r in results} == {"done"}
    # every task ran once (failover happens inside the run, not by re-leasing)
    assert [r["attempts"] for r in results] == [1] * 15
    by = gw.metrics.snapshot(None)["upstream_calls_by_upstream"]
    # the first answered 503 until its breaker opened (3 failures, plus calls already on
    # their way when it did: one per worker at most); the second answered every task
    assert set(by["first"]) == {"503"} and 3 <= by["first"]["503"] <= 3 + cfg.workers
    assert by["second"] == {"200": 15}
    assert statuses(good) == {"200": 15}
    assert gw.pool.router.state(gw.pool.clock.now())["first"] == "open"


async def test_unreachable_first_upstream_fails_over(sim_server, gateway) -> None:
    good = await sim_server(time_scale=20, ttft_ms=50, itl_ms=1, seed=3)
    base = gateway_config(good, time_scale=20, workers=2)
    dead = replace(base.upstream, name="dead", base_url=f"http://127.0.0.1:{free_port()}/v1")
    cfg = replace(base, upstreams=(dead, replace(base.upstream, name="live")))
    gw = await gateway(cfg)
    ids = await post_all(gw, [{**CHAT, "user": "bench"}] * 6)
    async with aiohttp.ClientSession() as s:
        results = [await poll(s, gw, task_id) for task_id in ids]
        async with s.post(f"{gw.url}/v1/chat/completions",
                          json={**CHAT, "user": "bench"}) as r:
            assert r.status == 200
    assert {r["state"] for r in results} == {"done"}
    by = gw.metrics.snapshot(None)["upstream_calls_by_upstream"]
    assert set(by["dead"]) == {"0"} and by["live"] == {"200": 7}


async def test_full_window_spills_to_the_next_upstream(sim_server, gateway) -> None:
    primary = await sim_server(time_scale=20, ttft_ms=50, itl_ms=1, seed=4)
    spare = await sim_server(time_scale=20, ttft_ms=50, itl_ms=1, seed=5)
    base = gateway_config(primary, time_scale=20, workers=3)
    first = replace(base.upstream, name="primary", rpm=4, failover_on_429=True)
    cfg = replace(base, upstreams=(first, replace(base.upstream, name="spare",
                                                  base_url=spare.base_url())))
    gw = await gateway(cfg)
    ids = await post_all(gw, [{**CHAT, "user": "bench", "lane": "interactive"}] * 10)
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*[poll(s, gw, task_id, timeout_s=10) for task_id in ids])
    assert {r["state"] for r in results} == {"done"}
    # the primary's window holds 4 calls a minute: the other 6 went to the spare at once
    # instead of waiting a virtual minute (3 wall seconds) for the window to turn over
    assert statuses(primary) == {"200": 4} and statuses(spare) == {"200": 6}


def test_a_model_any_upstream_serves_is_accepted() -> None:
    cfg = replace(default_config(), upstreams=(*ups("a", models=("small",)),
                                               *ups("b", models=("small", "big"))))
    body = {"user": "u", "model": "big", "messages": [{"role": "user", "content": "x"}]}
    assert parse_task(body, {}, cfg, "interactive").body["model"] == "big"
    with pytest.raises(BadRequest) as info:
        parse_task({**body, "model": "huge"}, {}, cfg, "interactive")
    assert info.value.code == "model_not_found"
    assert info.value.message.endswith("expected one of small, big.")


async def test_a_breaker_opened_by_one_gateway_holds_for_the_other(redis_server, sim_server,
                                                                   gateway) -> None:
    down = await sim_server(sim_parse({"providers": [_outage_provider()], "time_scale": 20,
                                       "seed": 1}, "<test>"), ttft_ms=10, itl_ms=1)
    good = await sim_server(time_scale=20, ttft_ms=50, itl_ms=1, seed=2)
    base = gateway_config(down, time_scale=20, workers=1,
                          breaker=BreakerSettings(failures=3, cooldown_s=600.0))
    cfg = replace(base, upstreams=(replace(base.upstream, name="first"),
                                   replace(base.upstream, name="second",
                                           base_url=good.base_url())))
    one = await gateway(cfg, redis_url=redis_server.url)
    other = await gateway(cfg, redis_url=redis_server.url)
    await other.pool.close()   # it takes no work until the first one's breaker is open
    ids = await post_all(one, [{**CHAT, "user": "bench"}] * 4)
    async with aiohttp.ClientSession() as s:
        results = [await poll(s, one, task_id) for task_id in ids]
    deadline = asyncio.get_running_loop().time() + 10
    while other.pool.router.state(other.pool.clock.now())["first"] != "open":
        assert asyncio.get_running_loop().time() < deadline, "the breaker was not relayed"
        await asyncio.sleep(0.02)
    await one.pool.close()
    other.pool.start()
    ids = await post_all(other, [{**CHAT, "user": "bench"}] * 4)
    async with aiohttp.ClientSession() as s:
        results += [await poll(s, other, task_id) for task_id in ids]
    assert [r["state"] for r in results] == ["done"] * 8
    assert one.metrics.snapshot(None)["upstream_calls_by_upstream"]["first"] == {"503": 3}
    # the second gateway never called the upstream that is down
    assert other.metrics.snapshot(None)["upstream_calls_by_upstream"] == {"second": {"200": 4}}


async def test_a_429_holds_the_upstream_for_every_gateway_sharing_it(redis_server, sim_server,
                                                                      gateway) -> None:
    # the upstream takes one call a minute and another client on the key has just used it:
    # the gateway's first call meets a 429 (retry after the rest of the minute), which
    # must hold the shared window, for the gateway that got it and for the other one,
    # rather than each task and process finding out by a 429
    sim = await sim_server(time_scale=20, ttft_ms=10, itl_ms=1, seed=6, rpm=1)
    cfg = gateway_config(sim, time_scale=20, workers=1)
    one = await gateway(cfg, redis_url=redis_server.url)
    other = await gateway(cfg, redis_url=redis_server.url)
    await other.pool.close()  # it only looks at the shared window
    async with aiohttp.ClientSession() as s, s.post(
            f"{sim.base_url()}/chat/completions", json={**CHAT, "model": "gpt-4o-mini"},
            headers={"Authorization": "Bearer sk-ratelab"}) as r:
        assert r.status == 200
    await post_all(one, [{**CHAT, "user": "bench"}])
    deadline = asyncio.get_running_loop().time() + 10
    while statuses(sim).get("429", 0) == 0:
        assert asyncio.get_running_loop().time() < deadline, "no 429 from the upstream"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # the hold is written after the answer is read
    name = cfg.upstreams[0].name
    for gw in (one, other):
        wait = await gw.pool.windows[name].acquire(gw.pool.clock.now(), PROBE)
        assert 30.0 < wait <= 60.0, wait  # most of the upstream's minute is left
    assert statuses(sim) == {"200": 1, "429": 1}


async def test_a_429_too_large_holds_nothing(sim_server, gateway) -> None:
    # the request alone is over the upstream's TPM: no retry can succeed, and the window
    # is no fuller than before, so other calls go on at once
    sim = await sim_server(time_scale=20, ttft_ms=10, itl_ms=1, seed=7, tpm=1000)
    cfg = gateway_config(sim, time_scale=20, workers=1)
    gw = await gateway(cfg)
    big = {**CHAT, "user": "bench", "max_tokens": 5000}
    [task_id] = await post_all(gw, [big])
    async with aiohttp.ClientSession() as s:
        failed = await poll(s, gw, task_id)
    assert failed["state"] == "failed" and failed["upstream_status"] == 429
    window = gw.pool.windows[cfg.upstreams[0].name]
    assert await window.acquire(gw.pool.clock.now(), PROBE) == 0.0


BROKE = Classified(Verdict.FATAL_BALANCE, "HTTP 402 insufficient_balance")


def test_a_refusal_for_money_takes_the_upstream_out_until_its_probe() -> None:
    router = Router(ups("a", "b"), BreakerSettings(), probe_s=60.0)
    router.on_answer(10.0, "a", BROKE, 402)
    assert router.choose(10.0, "m") == "b" and router.in_rotation(10.0, "m")
    assert router.out_reasons == {"a": "HTTP 402 insufficient_balance"}
    assert router.paused_s(10.0) is None
    router.on_answer(20.0, "b", replace(BROKE, verdict=Verdict.FATAL_AUTH), 401)
    # both out: nothing to send until a's probe is due at 70 s
    assert router.choose(20.0, "m") is None and not router.in_rotation(20.0, "m")
    assert router.paused_s(20.0) == 50.0
    assert router.choose(70.0, "m") == "a" and router.paused_s(70.0) is None
    router.on_dispatch(70.0, "a")   # the probe: no other call until it answers
    assert router.choose(71.0, "m") is None
    router.on_answer(72.0, "a", OK, 200)
    assert router.choose(72.0, "m") == "a" and set(router.out_reasons) == {"b"}
    # a 5xx or a 429 keeps an upstream in the rotation (its breaker or window deals)
    router.on_answer(73.0, "a", FAIL, 503)
    assert router.choose(73.0, "m") == "a"


def _broke_provider(name: str, balance_usd: float | str) -> dict[str, object]:
    provider = yaml.safe_load(DEFAULT_PROVIDER_YAML)
    provider["name"] = name
    provider["responder"] = {"kind": "batch_json"}
    provider["billing"] = {"balance_usd": balance_usd, "charge_headers": True}
    return provider


ITEM = {"user": "bench", "lane": "background"}


async def test_a_402_moves_the_work_to_the_backup_upstream(sim_server, gateway) -> None:
    """The primary's balance pays for a few calls: its 402 takes it out of the rotation and
    every task, chat or packed item, is done by the backup, none failed."""
    sim = await sim_server(sim_parse({"providers": [_broke_provider("primary", 0.00003),
                                                   _broke_provider("backup", "unlimited")],
                                      "time_scale": 20, "seed": 3}, "<test>"),
                           ttft_ms=20, itl_ms=1)
    base = gateway_config(sim, time_scale=20, workers=2)
    cfg = replace(base, upstreams=(
        replace(base.upstream, name="primary", base_url=sim.base_url("primary")),
        replace(base.upstream, name="backup", base_url=sim.base_url("backup"))))
    gw = await gateway(cfg)
    ids = await post_all(gw, [{**CHAT, "user": "bench"}] * 12 + [
        {**ITEM, "item": {"id": f"i{n}", "text": f"item text number {n}"}} for n in range(30)])
    async with aiohttp.ClientSession() as s:
        results = [await poll(s, gw, task_id) for task_id in ids]
    assert {r["state"] for r in results} == {"done"}
    snap = gw.metrics.snapshot(None)
    by = snap["upstream_calls_by_upstream"]
    assert by["primary"]["402"] >= 1 and "200" in by["backup"]
    # once out, the primary had no more calls than the workers had on their way
    assert by["primary"]["402"] <= cfg.workers
    assert set(snap["out_of_rotation"]) == {"primary"}
    assert 'ratelab_gateway_upstream_out_of_rotation{upstream="primary"} 1' in (
        gw.metrics.prometheus(None))


async def test_with_every_balance_spent_tasks_wait_for_a_top_up(sim_server, gateway) -> None:
    """A single upstream runs dry: tasks stay queued (none failed, no attempt counted),
    and after an admin top-up the next probe lets them all finish."""
    sim = await sim_server(sim_parse({"providers": [_broke_provider("only", 0.000005)],
                                      "time_scale": 20, "seed": 4}, "<test>"),
                           ttft_ms=20, itl_ms=1)
    base = gateway_config(sim, time_scale=20, workers=2)
    cfg = replace(base, upstreams=(replace(base.upstream, name="only"),), probe_s=10.0)
    gw = await gateway(cfg)
    ids = await post_all(gw, [{**CHAT, "user": "bench"}] * 20)
    async with aiohttp.ClientSession() as s:
        deadline = asyncio.get_running_loop().time() + 10
        while not gw.metrics.out_of_rotation:   # until the first 402
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        waiting = []
        for task_id in ids:
            async with s.get(f"{gw.url}/v1/tasks/{task_id}") as r:
                waiting.append((await r.json())["state"])
        assert "failed" not in waiting and "queued" in waiting
        assert set(gw.metrics.snapshot(None)["out_of_rotation"]) == {"only"}
        sim.providers["only"].topup("sk-ratelab", 1.0)
        results = [await poll(s, gw, task_id) for task_id in ids]
    assert {r["state"] for r in results} == {"done"}
    assert {r["attempts"] for r in results} == {1}   # a held task's claim was not counted
    assert gw.metrics.snapshot(None)["out_of_rotation"] == {}
    calls = statuses(sim)
    assert calls["200"] == 20 and calls["402"] >= 1


async def test_a_batch_over_the_cost_cap_is_halved(sim_server, gateway) -> None:
    """A per-request cost cap refuses 20-item batches: the gateway halves the batch until
    it passes rather than failing every item in it."""
    provider = _broke_provider("capped", "unlimited")
    provider["billing"] = {"balance_usd": "unlimited", "charge_headers": True,
                           "cost_cap_usd": 0.0001}
    sim = await sim_server(sim_parse({"providers": [provider], "time_scale": 20, "seed": 5},
                                     "<test>"), ttft_ms=20, itl_ms=1)
    gw = await gateway(gateway_config(sim, time_scale=20, workers=1))
    ids = await post_all(gw, [{**ITEM, "item": {"id": f"i{n}", "text": f"item text number {n}"}}
                              for n in range(40)])
    async with aiohttp.ClientSession() as s:
        results = [await poll(s, gw, task_id) for task_id in ids]
    assert {r["state"] for r in results} == {"done"}
    calls = statuses(sim)
    assert calls.get("400", 0) >= 1            # refused for its size, then halved
    assert gw.pool.max_items < 20 and calls["200"] < 40, (calls, gw.pool.max_items)


async def test_cost_metered_per_upstream_lane_and_user(sim_server, gateway, caplog) -> None:
    """Charges from the provider's headers add up to what it billed, split by lane and by
    user (a packed call shared evenly by its items); the balance it reports is kept, and
    crossing the upstream's low_balance_usd is logged once."""
    sim = await sim_server(sim_parse({"providers": [_broke_provider("paid", 1.0)],
                                      "time_scale": 20, "seed": 6}, "<test>"),
                           ttft_ms=20, itl_ms=1)
    base = gateway_config(sim, time_scale=20, workers=2)
    cfg = replace(base, upstreams=(replace(base.upstream, name="paid",
                                           low_balance_usd=0.99999),))
    gw = await gateway(cfg)
    ids = await post_all(gw, [{**CHAT, "user": "bench"}] * 5 + [{**CHAT, "user": "pat"}] * 5 + [
        {**ITEM, "item": {"id": f"i{n}", "text": f"item text number {n}"}} for n in range(20)])
    async with aiohttp.ClientSession() as s:
        assert {(await poll(s, gw, i))["state"] for i in ids} == {"done"}
    billed = sim.providers["paid"].stats()["keys"]["sk-ratelab"]
    cost = gw.metrics.snapshot(None)["cost_usd"]
    assert billed["spent_usd"] > 0
    assert cost["total"] == pytest.approx(billed["spent_usd"], rel=1e-6)
    assert cost["by_upstream"]["paid"]["balance"] == pytest.approx(billed["balance_usd"])
    assert sum(cost["by_user"].values()) == pytest.approx(cost["total"])
    assert sum(cost["by_lane"].values()) == pytest.approx(cost["total"])
    assert set(cost["by_user"]) == {"bench", "pat"} and cost["by_user"]["pat"] > 0
    assert 1.0 - billed["balance_usd"] > 0.00001   # it crossed the threshold, once
    warned = [r.getMessage() for r in caplog.records if "is below" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("gateway: upstream paid balance 0.9999")
    assert 'ratelab_gateway_balance_usd{upstream="paid"}' in gw.metrics.prometheus(None)


async def test_cost_from_prices_when_the_provider_sends_no_charge(sim_server, gateway) -> None:
    provider = _broke_provider("quiet", "unlimited")
    provider["billing"] = {"balance_usd": "unlimited", "charge_headers": False}
    sim = await sim_server(sim_parse({"providers": [provider], "time_scale": 20, "seed": 7},
                                     "<test>"), ttft_ms=20, itl_ms=1)
    cfg = parse_config({"upstreams": [{"name": "quiet", "base_url": sim.base_url(),
                                       "api_key": "sk-ratelab", "prices": {
                                           "gpt-4o-mini": {"input": 1.0, "output": 10.0}}}],
                        "time_scale": 20, "default_tier": "u",
                        "tiers": {"u": {"rpm": None, "tokens_per_day": None}}}, "gw.yaml")
    gw = await gateway(cfg)
    ids = await post_all(gw, [{**CHAT, "user": "bench"}] * 4)
    async with aiohttp.ClientSession() as s:
        results = [await poll(s, gw, i) for i in ids]
    tokens_in = sum(r["result"]["usage"]["prompt_tokens"] for r in results)
    tokens_out = sum(r["result"]["usage"]["completion_tokens"] for r in results)
    expected = (tokens_in * 1.0 + tokens_out * 10.0) / 1e6
    assert expected > 0
    assert gw.metrics.snapshot(None)["cost_usd"]["total"] == pytest.approx(expected)
    with pytest.raises(ConfigError, match=r"upstreams\[0\].prices.m.input: expected a "
                                          r"finite number >= 0.0, got 'cheap'"):
        parse_config({"upstreams": [{"base_url": "http://x/v1", "api_key": "k",
                                     "prices": {"m": {"input": "cheap"}}}]}, "gw.yaml")


def test_only_an_answer_sent_after_the_refusal_brings_an_upstream_back() -> None:
    """A call that left before the 402 and answers after it says nothing of the balance
    now: the upstream stays out until its probe's answer."""
    router = Router(ups("a", "b"), BreakerSettings(), probe_s=60.0)
    router.on_answer(10.0, "a", BROKE, 402, sent_at=9.0)
    router.on_answer(11.0, "a", OK, 200, sent_at=8.0)    # in flight when the 402 came
    assert router.choose(11.0, "m") == "b" and set(router.out_reasons) == {"a"}
    assert router.probe_in(11.0, "m") == 0.0            # b serves m meanwhile
    only_a = Router((*ups("a"), *ups("b", models=("other",))), BreakerSettings(), 60.0)
    only_a.on_answer(10.0, "a", BROKE, 402)
    assert only_a.probe_in(30.0, "m") == 40.0 and only_a.probe_in(30.0, "other") == 0.0
    only_a.on_dispatch(70.0, "a")                       # the probe
    only_a.on_answer(71.0, "a", OK, 200, sent_at=70.0)
    assert only_a.in_rotation(71.0, "m") and only_a.out_reasons == {}


async def test_a_model_whose_upstreams_are_all_out_does_not_starve_the_others(
        sim_server, gateway) -> None:
    """Upstream a (the only one for gpt-4o) is broke, b serves gpt-4o-mini: a worker holding
    gpt-4o tasks waits for a's probe instead of claiming them again in a loop that never
    yields, so the event loop stays responsive and the other model's tasks finish."""
    broke = _broke_provider("a", 0.0)
    sim = await sim_server(sim_parse({"providers": [broke, _broke_provider("b", "unlimited")],
                                      "time_scale": 20, "seed": 9}, "<test>"),
                           ttft_ms=20, itl_ms=1)
    base = gateway_config(sim, time_scale=20, workers=2)
    cfg = replace(base, upstreams=(
        replace(base.upstream, name="a", base_url=sim.base_url("a"), models=("gpt-4o",)),
        replace(base.upstream, name="b", base_url=sim.base_url("b"),
                models=("gpt-4o-mini",))))
    gw = await gateway(cfg)
    held = await post_all(gw, [{**CHAT, "user": "bench", "model": "gpt-4o"}] * 3)
    lags: list[float] = []

    async def heartbeat() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(40):
            t0 = loop.time()
            await asyncio.sleep(0.02)
            lags.append(loop.time() - t0 - 0.02)

    beat = asyncio.create_task(heartbeat())
    served = await post_all(gw, [{**CHAT, "user": "bench", "model": "gpt-4o-mini"}] * 5)
    async with aiohttp.ClientSession() as s:
        assert {(await poll(s, gw, i))["state"] for i in served} == {"done"}
        await beat
        for task_id in held:
            async with s.get(f"{gw.url}/v1/tasks/{task_id}") as r:
                task = await r.json()
            assert task["state"] in ("queued", "running") and task["attempts"] <= 1
    assert max(lags) < 0.5   # the loop kept turning (spinning, it did not for seconds)
    assert gw.metrics.upstream_calls_by[("a", 402)] <= cfg.workers
