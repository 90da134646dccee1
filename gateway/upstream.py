"""Streaming upstream calls that hand each token to a callback as it arrives.

``batchclient.AiohttpTransport`` reads a whole stream before returning; the gateway must
forward tokens to SSE subscribers while they arrive, so it reads the provider's SSE itself
here and returns a batchclient ``Response``. A tool call streams as pieces of its
arguments: each delta goes to the callback as an event of its own, and the calls put
together go back in ``Response.tool_calls``.

The batching client's watchdog applies as in its transport: a first token later than
``first_token_s`` or a reply fallen into a loop cancels the stream (the connection is
closed, so the provider stops generating) and comes back as the transport's error kinds,
``watchdog_first_token`` and ``watchdog_loop``, which ``classify`` retries elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from batchclient.config import StreamSettings
from batchclient.policy.watchdog import LoopWatch
from batchclient.policy.wire import ErrorKind, Response, Usage


async def stream_chat(session: aiohttp.ClientSession, base_url: str, api_key: str,
                      body: Mapping[str, object], timeout_s: float, time_scale: float,
                      watchdog: StreamSettings,
                      on_token: Callable[[dict[str, Any]], None]) -> Response:
    """POST a streaming chat request; ``on_token(event)`` per delta: ``{"token": piece}``
    for content, ``{"token": "", "tool_calls": [...]}`` for a piece of a tool call (the
    delta's entries as the provider sent them). Timeouts and the ``watchdog`` deadline are
    virtual seconds, as the elapsed times in the response; a failure without a reply is
    ``status 0``. ``ttft_s`` is set whenever a token reached ``on_token``, failures too."""
    start = time.monotonic()
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    parts: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    usage: Usage | None = None
    ttft: float | None = None
    loop = LoopWatch(watchdog.loop_min_period, watchdog.loop_repeats)
    # As in the client's transport: the first-token deadline covers the wait for the
    # response headers too (a server may hold them until the first token); it is lifted at
    # the first token.
    first_token = asyncio.timeout(watchdog.first_token_s / time_scale)
    try:
        async with first_token, session.post(
                f"{base_url}/chat/completions", data=json.dumps(payload), headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s / time_scale)) as resp:
            lowered = {k.lower(): v for k, v in resp.headers.items()}
            if resp.status != 200:
                first_token.reschedule(None)
                return Response(resp.status, lowered, await resp.text(),
                                elapsed_s=(time.monotonic() - start) * time_scale)
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    continue
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = delta.get("content")
                    tools = delta.get("tool_calls")
                    if (piece or tools) and ttft is None:
                        ttft = (time.monotonic() - start) * time_scale
                        first_token.reschedule(None)
                    if piece:
                        if loop.feed(piece):
                            resp.close()  # the provider sees the client leave and stops
                            return Response(resp.status, lowered, ttft_s=ttft,
                                            elapsed_s=(time.monotonic() - start) * time_scale,
                                            error="watchdog_loop")
                        parts.append(piece)
                        on_token({"token": piece})
                    if isinstance(tools, list) and tools:
                        _merge_calls(calls, tools)
                        on_token({"token": "", "tool_calls": tools})
                    finish = choice.get("finish_reason") or finish
                raw_usage = chunk.get("usage")
                if isinstance(raw_usage, dict):
                    usage = Usage(int(raw_usage.get("prompt_tokens", 0)),
                                  int(raw_usage.get("completion_tokens", 0)))
            return Response(resp.status, lowered, content="".join(parts), finish_reason=finish,
                            usage=usage, elapsed_s=(time.monotonic() - start) * time_scale,
                            ttft_s=ttft, tool_calls=tuple(calls[i] for i in sorted(calls)))
    except TimeoutError:
        kind: ErrorKind = "watchdog_first_token" if first_token.expired() else "timeout"
    except aiohttp.ClientConnectorError:
        kind = "connect"
    except (aiohttp.ClientError, ConnectionError):
        kind = "reset"
    return Response(0, elapsed_s=(time.monotonic() - start) * time_scale, ttft_s=ttft,
                    error=kind)


def _merge_calls(calls: dict[int, dict[str, Any]], deltas: list[Any]) -> None:
    """Add one chunk's tool-call deltas to the calls so far: the first delta of a call
    brings its id, type and name, every one a piece of its arguments."""
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index", 0)
        call = calls.setdefault(index if isinstance(index, int) else 0, {
            "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        for key in ("id", "type"):
            if isinstance(delta.get(key), str):
                call[key] = delta[key]
        function = delta.get("function")
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                call["function"]["name"] = function["name"]
            if isinstance(function.get("arguments"), str):
                call["function"]["arguments"] += function["arguments"]


def completion_from_stream(response: Response, model: str, task_id: str) -> dict[str, object]:
    """An OpenAI chat-completion object assembled from a streamed response (its tool
    calls too: then the content is null unless the model also wrote text)."""
    usage = response.usage or Usage(0, 0)
    message: dict[str, Any] = {"role": "assistant", "content": response.content or ""}
    if response.tool_calls:
        message["content"] = response.content or None
        message["tool_calls"] = [dict(call) for call in response.tool_calls]
    return {
        "id": f"chatcmpl-{task_id}", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": response.finish_reason or "stop"}],
        "usage": {"prompt_tokens": usage.prompt_tokens,
                  "completion_tokens": usage.completion_tokens, "total_tokens": usage.total},
    }
