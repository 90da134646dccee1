"""End to end through HTTP: enqueue, poll, SSE, pass-through, bad input, metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from gateway.server import RunningGateway
from tests.gateway.conftest import gateway_config, sse_events

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}


async def poll(session: aiohttp.ClientSession, gw: RunningGateway, task_id: str,
               timeout_s: float = 15.0) -> dict[str, Any]:
    """Poll a task until it is final."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with session.get(f"{gw.url}/v1/tasks/{task_id}") as r:
            assert r.status == 200
            data: dict[str, Any] = await r.json()
        if data["state"] in ("done", "failed", "dead_lettered"):
            return data
        assert asyncio.get_running_loop().time() < deadline, data
        await asyncio.sleep(0.02)


async def test_enqueue_poll_result(sim_server, gateway) -> None:
    sim = await sim_server(time_scale=20, seed=3)
    gw = await gateway(gateway_config(sim))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/tasks", json={**CHAT, "user": "ann",
                                                       "lane": "interactive"}) as r:
            assert r.status == 202
            accepted = await r.json()
            assert r.headers["Location"] == f"/v1/tasks/{accepted['id']}"
        assert accepted["state"] == "queued" and accepted["id"].startswith("task_")
        done = await poll(s, gw, accepted["id"])
    assert done["state"] == "done"
    assert done["attempts"] == 1
    assert done["result"]["object"] == "chat.completion"
    assert done["result"]["choices"][0]["message"]["content"]
    assert done["result"]["usage"]["prompt_tokens"] == 3 + 3 + 3  # "Say hello." = 3 tokens


async def test_sse_events_state_changes_and_tokens(sim_server, gateway) -> None:
    sim = await sim_server(time_scale=20, seed=4)
    gw = await gateway(gateway_config(sim))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/tasks", json={**CHAT, "user": "ann", "stream": True,
                                                       "lane": "interactive"}) as r:
            task_id = (await r.json())["id"]
        events = await sse_events(s, f"{gw.url}/v1/tasks/{task_id}/events")
    kinds = [k for k, _ in events]
    states = [e["state"] for k, e in events if k == "state"]
    assert kinds[-1] == "end"
    assert states[-1] == "done"
    assert states == sorted(set(states), key=states.index)  # each state once, in order
    tokens = "".join(e["token"] for k, e in events if k == "token")
    final = next(e for k, e in events if k == "state" and e["state"] == "done")
    assert tokens and final["result"]["choices"][0]["message"]["content"] == tokens


async def test_pass_through_and_streaming(sim_server, gateway) -> None:
    sim = await sim_server(time_scale=20, seed=5)
    gw = await gateway(gateway_config(sim))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                          headers={"X-Ratelab-User": "ann"}) as r:
            assert r.status == 200
            body = await r.json()
            task_id = r.headers["x-ratelab-task-id"]
        assert body["object"] == "chat.completion"
        async with s.get(f"{gw.url}/v1/tasks/{task_id}") as r:
            assert (await r.json())["lane"] == "interactive"
        async with s.post(f"{gw.url}/v1/chat/completions",
                          json={**CHAT, "user": "pat", "stream": True}) as r:
            assert r.status == 200
            text = await r.text()
            streamed_id = r.headers["x-ratelab-task-id"]
        async with s.get(f"{gw.url}/v1/tasks/{streamed_id}") as r:
            result = (await r.json())["result"]["choices"][0]
    chunks = [json.loads(line[5:]) for line in text.splitlines()
              if line.startswith("data:") and line != "data: [DONE]"]
    assert text.rstrip().endswith("data: [DONE]")
    # the provider's finish reason (16 tokens cut the lorem reply: "length")
    assert chunks[-1]["choices"][0]["finish_reason"] == result["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == result[
        "message"]["content"]


async def test_openai_sdk_pass_through(sim_server, gateway) -> None:
    import openai
    sim = await sim_server(time_scale=20, seed=6)
    gw = await gateway(gateway_config(sim))
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    reply = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        user="ann")
    await client.close()
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens <= 8


async def test_tool_calls_and_a_cut_reply_pass_through_streamed_or_not(sim_server,
                                                                        gateway) -> None:
    import openai
    import pydantic

    class Part(pydantic.BaseModel):
        name: str
        count: int

    sim = await sim_server(time_scale=20, seed=7)
    gw = await gateway(gateway_config(sim))
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0,
                                default_headers={"X-Ratelab-User": "ann"})
    tool = openai.pydantic_function_tool(Part)
    messages: Any = [{"role": "user", "content": "Hi"}]
    try:
        called = await client.chat.completions.parse(model="gpt-4o-mini", messages=messages,
                                                     tools=[tool])
        async with client.chat.completions.stream(model="gpt-4o-mini", messages=messages,
                                                  tools=[tool]) as stream:
            pieces = [event.arguments_delta async for event in stream
                      if event.type == "tool_calls.function.arguments.delta"]
            streamed = (await stream.get_final_completion()).choices[0]
        cut = await client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                   max_tokens=2, stream=True)
        reasons = [c.choices[0].finish_reason async for c in cut if c.choices]
    finally:
        await client.close()
    for choice in (called.choices[0], streamed):
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        call = choice.message.tool_calls[0]
        assert call.function.name == "Part" and call.id.startswith("call_")
        assert isinstance(call.function.parsed_arguments, Part)
    assert len(pieces) > 1  # the arguments arrived in pieces, as the provider sent them
    assert reasons[-1] == "length"  # a cut reply says so, not "stop"


async def test_bad_input(sim_server, gateway) -> None:
    sim = await sim_server(time_scale=20)
    gw = await gateway(gateway_config(sim, max_body_bytes=2000))
    cases: list[tuple[str, object, int, str]] = [
        ("/v1/tasks", b"{not json", 400, "invalid_json"),
        ("/v1/tasks", [1, 2], 400, "invalid_body"),
        ("/v1/tasks", {**CHAT}, 400, "missing_user"),
        ("/v1/tasks", {**CHAT, "user": "ann", "lane": "urgent"}, 400, "invalid_lane"),
        ("/v1/tasks", {"user": "ann", "messages": []}, 400, "invalid_messages"),
        ("/v1/tasks", {**CHAT, "user": "ann", "model": "gpt-9"}, 400, "model_not_found"),
        ("/v1/tasks", {**CHAT, "user": "ann", "max_tokens": 0}, 400, "invalid_max_tokens"),
        ("/v1/tasks", {"user": "ann", "item": {"id": "a b", "text": "x"}}, 400,
         "invalid_item"),
        ("/v1/tasks", {"user": "ann", "item": {"id": "a", "text": ""}}, 400, "invalid_item"),
        ("/v1/tasks", {"user": "ann", "item": {"id": "a", "text": " \n"}}, 400,
         "invalid_item"),
        ("/v1/tasks", {"user": "ann", "messages": [{"role": "user", "content": "x" * 5000}]},
         413, "request_too_large"),
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "missing_user"),
    ]
    async with aiohttp.ClientSession() as s:
        for path, body, status, code in cases:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with s.post(f"{gw.url}{path}", data=data,
                              headers={"Content-Type": "application/json"}) as r:
                err = await r.json()
                assert (r.status, err["error"]["code"]) == (status, code), (body, err)
                assert err["error"]["type"] and err["error"]["message"]
        async with s.get(f"{gw.url}/v1/tasks/task_nope") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "task_not_found"
        async with s.get(f"{gw.url}/v1/tasks/task_nope/events") as r:
            assert r.status == 404
        async with s.get(f"{gw.url}/v1/nothing") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "unknown_url"


async def test_healthz_and_metrics(sim_server, gateway) -> None:
    sim = await sim_server(time_scale=20)
    gw = await gateway(gateway_config(sim))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/healthz") as r:
            assert (r.status, (await r.json())["backend"]) == (200, "sqlite")
        for _ in range(6):
            async with s.post(f"{gw.url}/v1/tasks", json={**CHAT, "user": "ann"}) as r:
                pass
        async with s.get(f"{gw.url}/metrics?format=json") as r:
            m = await r.json()
        async with s.get(f"{gw.url}/metrics") as r:
            text = await r.text()
    assert m["accepted"] == {"background": 5}
    assert m["refused"] == [{"tier": "free", "limit": "requests_per_minute", "count": 1}]
    assert set(m["queue_depth"]) == {"interactive", "batch", "background", "shared"}
    assert m["interactive_p95_budget_s"] == 2.0 and m["interactive_p95_within_budget"]
    assert 'ratelab_gateway_refused_total{tier="free",limit="requests_per_minute"} 1' in text
    assert "ratelab_gateway_queue_depth{queue=\"background\"}" in text


async def test_pass_through_under_the_same_user_limits(sim_server, gateway) -> None:
    sim = await sim_server(time_scale=20)
    gw = await gateway(gateway_config(sim))
    async with aiohttp.ClientSession() as s:
        got = []
        for i in range(7):   # free tier: 5 requests in a burst, tasks and chats together
            path = "/v1/tasks" if i % 2 else "/v1/chat/completions"
            async with s.post(f"{gw.url}{path}", json={**CHAT, "user": "ann"}) as r:
                got.append((path, r.status))
                body = await r.json()
    assert [status for _, status in got] == [200, 202, 200, 202, 200, 429, 429]
    assert body["error"]["limit"] == "requests_per_minute"


async def test_a_request_larger_than_a_day_is_refused_for_good(sim_server, gateway) -> None:
    """No wait admits it: no retry-after, x-should-retry false, and words that say so;
    the openai SDK, retries on, gives up at once."""
    import openai
    sim = await sim_server(time_scale=20)
    gw = await gateway(gateway_config(sim))
    async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/tasks",
                      json={**CHAT, "user": "ann", "max_tokens": 6000}) as r:
        body = await r.json()
        assert r.status == 429
        assert r.headers["x-should-retry"] == "false"
        assert "retry-after" not in r.headers
    assert body["error"]["limit"] == "request_larger_than_tokens_per_day"
    assert body["error"]["message"] == (
        "User 'ann' (tier 'free') is over the limit on tokens per day: one request is larger "
        "than the day's 5,000 tokens, so no retry can succeed; lower max_tokens or shorten "
        "the prompt.")
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=2)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=6000,
            user="ann")
    await client.close()
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/metrics?format=json") as r:
        metrics = await r.json()
    assert metrics["refused"] == [{"tier": "free", "limit": "request_larger_than_tokens_per_day",
                                   "count": 2}]


def test_a_chunk_carries_a_tool_call_and_any_text_beside_it() -> None:
    from gateway.app import _chunk

    call = [{"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": "{}"}}]

    def delta(raw: bytes) -> dict[str, Any]:
        return dict(json.loads(raw.decode()[len("data: "):])["choices"][0]["delta"])

    assert delta(_chunk("t", "Looking it up.", None, call)) == {
        "content": "Looking it up.", "tool_calls": call}
    assert delta(_chunk("t", "", None, call)) == {"tool_calls": call}
    assert delta(_chunk("t", "hi", None)) == {"content": "hi"}
    assert delta(_chunk("t", None, "stop")) == {}
