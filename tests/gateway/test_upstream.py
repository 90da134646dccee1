"""Streamed upstream calls: the client's watchdog (a late first token, a repetition loop)
cancels the stream and the call is retried elsewhere; a stream that breaks after its first
tokens restarts, so a subscriber's tokens are those of the attempt that finished."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import aiohttp
import yaml

from batchclient.config import StreamSettings
from gateway.server import RunningGateway
from simulator.model.config import DEFAULT_PROVIDER_YAML
from simulator.model.config import parse_config as sim_parse
from simulator.server import RunningServer
from tests.gateway.conftest import gateway_config, sse_events
from tests.gateway.test_app import poll
from tests.gateway.test_shared import statuses

SCALE = 20


def faulty(faults: dict[str, object], seed: int, output_tokens: int = 40) -> Any:
    """The built-in provider with ``faults`` and lorem replies of ``output_tokens``."""
    provider = yaml.safe_load(DEFAULT_PROVIDER_YAML)
    provider["faults"] = faults
    provider["responder"] = {"kind": "lorem", "output_tokens": output_tokens}
    return sim_parse({"providers": [provider], "time_scale": SCALE, "seed": seed}, "<test>")


def completion_tokens(sim: RunningServer) -> int:
    stats = next(iter(sim.providers.values())).stats()
    return int(stats["keys"]["sk-ratelab"]["models"]["gpt-4o-mini"]["completion_tokens"])


def streamed_text(events: list[tuple[str, dict[str, Any]]]) -> tuple[str, int]:
    """The text a subscriber keeps (the tokens after the last ``restart``) and how many
    restarts it saw."""
    kept: list[str] = []
    restarts = 0
    for kind, data in events:
        if kind == "restart":
            kept.clear()
            restarts += 1
        elif kind == "token":
            kept.append(data["token"])
    return "".join(kept), restarts


async def run_streamed(gw: RunningGateway, body: dict[str, Any]
                       ) -> tuple[dict[str, Any], str, int, float]:
    """Enqueue one streaming task and follow its SSE to the end: the final state event,
    the text kept, the restarts seen, and the task's virtual seconds from accepted to done."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/tasks", json={**body, "stream": True,
                                                       "lane": "interactive"}) as r:
            assert r.status == 202, await r.text()
            task_id = (await r.json())["id"]
        events = await sse_events(s, f"{gw.url}/v1/tasks/{task_id}/events")
    final = next(e for k, e in events if k == "state" and e["state"] in (
        "done", "failed", "dead_lettered"))
    text, restarts = streamed_text(events)
    task = await gw.store.get(task_id)
    assert task is not None
    return final, text, restarts, task.updated - task.created


def two_upstreams(bad: RunningServer, good: RunningServer, **changes: Any) -> Any:
    """A gateway config with ``bad`` first in failover order, then ``good``."""
    base = gateway_config(bad, time_scale=SCALE, **changes)
    return replace(base, upstreams=(replace(base.upstream, name="bad"),
                                    replace(base.upstream, name="good",
                                            base_url=good.base_url())))


async def test_a_late_first_token_is_cancelled_at_the_deadline_and_failed_over(
        sim_server, gateway) -> None:
    # the first upstream holds every first token 30 virtual seconds
    slow = await sim_server(faulty({"slow_first_token_rate": 1.0, "slow_first_token_s": 30},
                                   seed=1), ttft_ms=50, itl_ms=2)
    good = await sim_server(time_scale=SCALE, ttft_ms=50, itl_ms=2, seed=2)
    cfg = two_upstreams(slow, good)
    gw = await gateway(cfg)
    final, text, restarts, took = await run_streamed(gw, {"user": "bench", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 16})
    assert final["state"] == "done"
    assert text == final["result"]["choices"][0]["message"]["content"] and restarts == 0
    # cut at 5 virtual seconds, not waited out for 30: then the second upstream answered
    # at once (its first token in 0.05 s, 16 tokens 2 ms apart)
    assert 5.0 <= took < 20.0, took
    by = gw.metrics.snapshot(None)["upstream_calls_by_upstream"]
    assert by == {"bad": {"0": 1}, "good": {"200": 1}}
    assert statuses(slow) == {"200": 1}
    assert cfg.stream == StreamSettings(enabled=True, first_token_s=5.0)  # the client's


async def test_a_repetition_loop_is_cut_and_retried_on_the_next_upstream(sim_server,
                                                                          gateway) -> None:
    looping = await sim_server(faulty({"repetition_rate": 1.0}, seed=3), ttft_ms=50, itl_ms=2)
    good = await sim_server(time_scale=SCALE, ttft_ms=50, itl_ms=2, seed=4)
    gw = await gateway(two_upstreams(looping, good))
    final, text, restarts, _ = await run_streamed(gw, {"user": "bench", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 1000})
    assert final["state"] == "done"
    # the loop's tokens were streamed, then taken back: the subscriber keeps the reply
    assert restarts == 1
    assert text == final["result"]["choices"][0]["message"]["content"]
    assert "and so on" not in text
    by = gw.metrics.snapshot(None)["upstream_calls_by_upstream"]
    assert by == {"bad": {"200": 1}, "good": {"200": 1}}
    # the looping reply was cut after a few dozen tokens, not run to max_tokens
    assert 0 < completion_tokens(looping) < 100


async def test_a_subscriber_keeps_the_tokens_of_the_attempt_that_finished(sim_server,
                                                                         gateway) -> None:
    # half the replies break mid-stream (seeded): the retried ones stream again from the
    # start, after a restart event
    sim = await sim_server(faulty({"reset_rate": 0.5}, seed=3, output_tokens=60),
                           ttft_ms=50, itl_ms=2)
    gw = await gateway(gateway_config(sim, time_scale=SCALE))
    restarted = 0
    for k in range(10):
        final, text, restarts, _ = await run_streamed(gw, {"user": "bench", "messages": [
            {"role": "user", "content": f"tell {k}"}], "max_tokens": 60})
        assert final["state"] == "done"
        assert text == final["result"]["choices"][0]["message"]["content"], k
        restarted += restarts > 0
    assert restarted >= 2   # the seed breaks some streams after their first tokens
    assert gw.metrics.upstream_calls[0] >= restarted


async def looping_then_good(sim_server: Any, gateway: Any, seed: int) -> RunningGateway:
    """A gateway whose first upstream streams every reply into a loop, its second well."""
    looping = await sim_server(faulty({"repetition_rate": 1.0}, seed=seed), ttft_ms=50,
                               itl_ms=2)
    good = await sim_server(time_scale=SCALE, ttft_ms=50, itl_ms=2, seed=seed + 1)
    return await gateway(two_upstreams(looping, good))


async def test_a_late_subscriber_gets_only_the_final_attempts_tokens(sim_server,
                                                                    gateway) -> None:
    gw = await looping_then_good(sim_server, gateway, seed=5)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/tasks", json={
                "user": "bench", "stream": True, "lane": "interactive", "max_tokens": 1000,
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            task_id = (await r.json())["id"]
        done = await poll(s, gw, task_id)
        events = await sse_events(s, f"{gw.url}/v1/tasks/{task_id}/events")
    text, restarts = streamed_text(events)
    assert restarts == 0   # the hub dropped the first attempt's tokens at the restart
    assert text == done["result"]["choices"][0]["message"]["content"]
    by = gw.metrics.snapshot(None)["upstream_calls_by_upstream"]
    assert by == {"bad": {"200": 1}, "good": {"200": 1}}


async def test_a_pass_through_stream_that_restarts_ends_with_an_error(sim_server,
                                                                      gateway) -> None:
    gw = await looping_then_good(sim_server, gateway, seed=7)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/chat/completions", json={
                "user": "bench", "stream": True, "max_tokens": 1000,
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
            task_id = r.headers["x-ratelab-task-id"]
            text = await r.text()
        done = await poll(s, gw, task_id)
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    # the looping attempt's chunks went out, then an error in OpenAI's mid-stream form
    # (the openai SDK raises it) instead of a second reply run on after the first
    assert "[DONE]" not in data
    error = json.loads(data[-1])["error"]
    assert error["code"] == "stream_restarted" and f"/v1/tasks/{task_id}" in error["message"]
    assert all("choices" in json.loads(d) for d in data[:-1])
    # the task went on to the next upstream; its result is stored
    assert done["state"] == "done" and done["result"]["choices"][0]["message"]["content"]
