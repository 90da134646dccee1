"""The official openai SDK, sync and async, works unchanged against the simulator:
replies, streams with usage, raw headers, and its own retry rules (429 with
``retry-after-ms``, no retry on 402 or on ``x-should-retry: false``, raising on a
mid-stream error chunk), and its structured-output helpers (``parse`` with a pydantic
model, tool calls with parsed arguments, streamed or not)."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletionMessageParam

from simulator.model.config import SimulatorConfig, parse_config
from simulator.model.responder import expected_code
from simulator.model.tokens import text_tokens
from simulator.server import RunningServer

Start = Callable[..., Awaitable[RunningServer]]
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a short line about rate limits."}]
FAST = {"ttft_ms": 0.0, "itl_ms": 0.0}


def _responses(server: RunningServer) -> dict[int, int]:
    """HTTP responses the shell counted for the chat endpoint, by status."""
    return {status: n for (_, endpoint, status), n in server.app.counters.responses().items()
            if endpoint == "chat"}


def _provider(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "default", "keys": {"sk-ratelab": {}},
        "models": {"gpt-4o-mini": {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.6}},
        "responder": {"kind": "lorem", "output_tokens": 12},
    }
    base.update(extra)
    return base


def _config(time_scale: float = 1.0, **extra: object) -> SimulatorConfig:
    return parse_config({"providers": [_provider(**extra)], "time_scale": time_scale}, "<test>")


def test_sync_sdk_non_stream_stream_and_raw_headers(
    sim_thread: Callable[..., RunningServer],
) -> None:
    server = sim_thread(**FAST)
    client = openai.OpenAI(base_url=server.base_url(), api_key="sk-ratelab", max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           max_tokens=30)
    assert reply.object == "chat.completion"
    content = reply.choices[0].message.content or ""
    assert reply.usage is not None
    assert reply.usage.completion_tokens == text_tokens(content)

    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                            max_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    assert usage is not None
    assert usage.completion_tokens == text_tokens("".join(pieces))

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                           messages=MESSAGES, max_tokens=30)
    assert raw.status_code == 200
    assert raw.headers["x-ratelimit-limit-requests"] == "5000"
    assert raw.headers["x-ratelimit-remaining-requests"] == "4997"
    assert raw.headers["x-ratelimit-limit-tokens"] == "2000000"
    for name in ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests",
                 "x-ratelimit-reset-tokens", "X-MDB-Charged-USD"):
        assert name in raw.headers, name
    assert "X-MDB-Balance-USD" not in raw.headers  # the default balance is unlimited
    parsed = raw.parse()
    assert parsed.choices[0].message.role == "assistant"


async def test_async_sdk_non_stream_and_stream(sim_server: Start) -> None:
    server = await sim_server(**FAST)
    client = openai.AsyncOpenAI(base_url=server.base_url(), api_key="sk-ratelab",
                                max_retries=0)
    try:
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                     max_tokens=20)
        assert reply.usage is not None and reply.usage.completion_tokens <= 20
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(chunks) - 3  # role, finish, usage
        emb = await client.embeddings.create(model="text-embedding-3-small",
                                             input=["one", "two"])
        assert [len(d.embedding) for d in emb.data] == [1536, 1536]
    finally:
        await client.close()


async def test_sdk_retries_429_after_our_retry_after_ms(sim_server: Start) -> None:
    # 2 RPM on a sliding minute at time_scale 60: the minute is one wall second. The
    # third request is refused with retry-after-ms of about 1,000; the SDK waits that
    # long (its own backoff would be 0.375-0.5 s and hit a second 429) and succeeds.
    server = await sim_server(_config(
        time_scale=60.0, count_refused=False,
        limits={"algorithm": "sliding", "window_s": 60, "rpm": 2}))
    client = openai.AsyncOpenAI(base_url=server.base_url(), api_key="sk-ratelab",
                                max_retries=2)
    try:
        for _ in range(2):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        started = time.monotonic()
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES)
        waited = time.monotonic() - started
    finally:
        await client.close()
    assert raw.status_code == 200
    assert raw.retries_taken == 1
    assert _responses(server) == {200: 3, 429: 1}
    assert waited >= 0.9


async def test_402_raises_without_retry(sim_server: Start) -> None:
    server = await sim_server(_config(billing={"balance_usd": 0.0}))
    client = openai.AsyncOpenAI(base_url=server.base_url(), api_key="sk-ratelab",
                                max_retries=3)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        await client.close()
    assert caught.value.status_code == 402
    assert _responses(server) == {402: 1}


async def test_request_too_large_is_not_retried(sim_server: Start) -> None:
    # TPM 100 with max_tokens 500 reserved: no retry can ever succeed, so the simulator
    # sends x-should-retry: false and the SDK gives up at once.
    server = await sim_server(_config(limits={"tpm": 100, "counting": "reserve"}))
    client = openai.AsyncOpenAI(base_url=server.base_url(), api_key="sk-ratelab",
                                max_retries=3)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                 max_tokens=500)
    finally:
        await client.close()
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "Request too large" in caught.value.message
    assert _responses(server) == {429: 1}


async def test_mid_stream_error_chunk_makes_the_sdk_raise(sim_server: Start) -> None:
    server = await sim_server(_config(faults={"mid_stream_error_rate": 1.0},
                                      responder={"kind": "lorem", "output_tokens": 40}))
    client = openai.AsyncOpenAI(base_url=server.base_url(), api_key="sk-ratelab",
                                max_retries=0)
    received = []
    try:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                      stream=True)
        with pytest.raises(openai.APIError, match="mid-stream"):
            async for chunk in stream:
                received.append(chunk)
    finally:
        await client.close()
    assert _responses(server) == {200: 1}


async def test_connection_reset_surfaces_as_connection_error(sim_server: Start) -> None:
    server = await sim_server(_config(faults={"reset_rate": 1.0}))
    client = openai.AsyncOpenAI(base_url=server.base_url(), api_key="sk-ratelab",
                                max_retries=0)
    try:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        await client.close()


async def test_hold_fault_times_the_client_out(sim_server: Start) -> None:
    server = await sim_server(_config(faults={"hold_rate": 1.0, "hold_s": 600.0}))
    client = openai.AsyncOpenAI(base_url=server.base_url(), api_key="sk-ratelab",
                                max_retries=0, timeout=0.3)
    try:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        await client.close()


class _Part(pydantic.BaseModel):
    name: str
    count: int
    weight: float


class _Node(pydantic.BaseModel):
    label: str
    children: list[_Node]


class _Order(pydantic.BaseModel):
    id: int
    colour: Literal["red", "blue"]
    when: datetime.date
    note: str | None
    parts: list[_Part]
    tree: _Node


def test_structured_outputs_and_tool_calls_parse_in_the_sdk(
    sim_thread: Callable[..., RunningServer],
) -> None:
    server = sim_thread(**FAST)
    client = openai.OpenAI(base_url=server.base_url(), api_key="sk-ratelab", max_retries=0)
    # a strict JSON schema from a pydantic model: the SDK validates the reply against it
    reply = client.chat.completions.parse(model="gpt-4o-mini", messages=MESSAGES,
                                          response_format=_Order)
    order = reply.choices[0].message.parsed
    assert isinstance(order, _Order) and order.parts and order.tree.children
    with client.chat.completions.stream(model="gpt-4o-mini", messages=MESSAGES,
                                        response_format=_Order) as stream:
        assert isinstance(stream.get_final_completion().choices[0].message.parsed, _Order)
    # JSON mode needs the word in the messages, as OpenAI's does
    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                       response_format={"type": "json_object"})
    json_mode = client.chat.completions.create(
        model="gpt-4o-mini", response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Reply in JSON."}])
    assert set(json.loads(json_mode.choices[0].message.content or "")) == {"text"}
    # a tool loop: the model calls the tool, then answers the tool's result in text
    tool = openai.pydantic_function_tool(_Part)
    called = client.chat.completions.parse(model="gpt-4o-mini", messages=MESSAGES,
                                           tools=[tool])
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "_Part"
    assert isinstance(call.function.parsed_arguments, _Part)
    follow: list[ChatCompletionMessageParam] = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "stored"},
    ]
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=follow,
                                            tools=[tool])
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content
    assert answer.choices[0].message.tool_calls is None
    # streamed, the call's arguments arrive in pieces the SDK puts together
    with client.chat.completions.stream(model="gpt-4o-mini", messages=MESSAGES, tools=[tool],
                                        tool_choice="required") as stream:
        pieces = [event.arguments_delta for event in stream
                  if event.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.tool_calls
    streamed = final.message.tool_calls[0].function
    assert len(pieces) > 1 and "".join(pieces) == streamed.arguments
    assert isinstance(streamed.parsed_arguments, _Part)


class _Answer(pydantic.BaseModel):
    id: int
    c: Literal["A", "B", "C"]


class _Answers(pydantic.BaseModel):
    results: list[_Answer]


def test_parse_gets_a_batch_answer_held_to_its_schema(
    sim_thread: Callable[..., RunningServer],
) -> None:
    # a batch prompt under a strict schema (the SDK's parse): the items' own codes in the
    # schema's objects, as a model held to it writes them; the SDK validates the reply
    codes = ("A", "B", "C")
    server = sim_thread(item_codes=codes, **FAST)
    client = openai.OpenAI(base_url=server.base_url(), api_key="sk-ratelab", max_retries=0)
    texts = {101: "red apple", 102: "blue sky", 103: "green tree", 104: "grey cloud"}
    prompt = "Label each item.\n" + "\n".join(f"id={i}: {t}" for i, t in texts.items())
    reply = client.chat.completions.parse(
        model="gpt-4o-mini", response_format=_Answers,
        messages=[{"role": "user", "content": prompt}])
    parsed = reply.choices[0].message.parsed
    assert parsed is not None and reply.choices[0].finish_reason == "stop"
    assert [(a.id, a.c) for a in parsed.results] == [
        (i, expected_code(t, codes)) for i, t in texts.items()]

