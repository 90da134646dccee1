"""Streaming upstream calls that hand each token to a callback as it arrives.

``batchclient.AiohttpTransport`` reads a whole stream before returning (it needs the full
text for its watchdog); the gateway must forward tokens to SSE subscribers while they
arrive, so it reads the provider's SSE itself here and returns a batchclient ``Response``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping

import aiohttp

from batchclient.policy.wire import Response, Usage


async def stream_chat(session: aiohttp.ClientSession, base_url: str, api_key: str,
                      body: Mapping[str, object], timeout_s: float, time_scale: float,
                      on_token: Callable[[str], None]) -> Response:
    """POST a streaming chat request; ``on_token(piece)`` per content delta. Elapsed times
    in the response are virtual seconds; a failure without a reply is ``status 0``."""
    start = time.monotonic()
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    parts: list[str] = []
    finish: str | None = None
    usage: Usage | None = None
    ttft: float | None = None
    try:
        async with session.post(f"{base_url}/chat/completions", data=json.dumps(payload),
                                headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s / time_scale),
                                ) as resp:
            lowered = {k.lower(): v for k, v in resp.headers.items()}
            if resp.status != 200:
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
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if ttft is None:
                            ttft = (time.monotonic() - start) * time_scale
                        parts.append(piece)
                        on_token(piece)
                    finish = choice.get("finish_reason") or finish
                raw_usage = chunk.get("usage")
                if isinstance(raw_usage, dict):
                    usage = Usage(int(raw_usage.get("prompt_tokens", 0)),
                                  int(raw_usage.get("completion_tokens", 0)))
            return Response(resp.status, lowered, content="".join(parts), finish_reason=finish,
                            usage=usage, elapsed_s=(time.monotonic() - start) * time_scale,
                            ttft_s=ttft)
    except TimeoutError:
        return Response(0, elapsed_s=(time.monotonic() - start) * time_scale, error="timeout")
    except aiohttp.ClientConnectorError:
        return Response(0, elapsed_s=(time.monotonic() - start) * time_scale, error="connect")
    except (aiohttp.ClientError, ConnectionError):
        return Response(0, elapsed_s=(time.monotonic() - start) * time_scale, error="reset")


def completion_from_stream(response: Response, model: str, task_id: str) -> dict[str, object]:
    """An OpenAI chat-completion object assembled from a streamed response."""
    usage = response.usage or Usage(0, 0)
    return {
        "id": f"chatcmpl-{task_id}", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": response.content or ""},
                     "finish_reason": response.finish_reason or "stop"}],
        "usage": {"prompt_tokens": usage.prompt_tokens,
                  "completion_tokens": usage.completion_tokens, "total_tokens": usage.total},
    }
