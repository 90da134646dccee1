"""Transports: how a ``Call`` becomes a ``Response``.

``AiohttpTransport`` speaks OpenAI's chat-completions API over one keep-alive session
(non-streaming, or SSE with a watchdog that cancels on a slow first token or a repetition
loop); ``FunctionTransport`` maps calls to responses in-process for tests.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import aiohttp

from batchclient.config import ProviderSettings, StreamSettings
from batchclient.policy.watchdog import LoopWatch
from batchclient.policy.wire import Call, ErrorKind, Response, Usage


class Transport(Protocol):
    """Sends one call and returns what came back (never raises for HTTP or network errors)."""

    async def send(self, call: Call) -> Response:
        """Send ``call``; a failure without an HTTP reply is a Response with ``error``."""
        ...


class ModelLister(Protocol):
    """A transport that can also list the models a provider serves (``GET /v1/models``)."""

    async def list_models(self, provider: str) -> set[str] | None:
        """Model ids served by ``provider``, or None when it cannot tell."""
        ...


ResponseFn = Callable[[Call], Response | Awaitable[Response]]


class FunctionTransport:
    """A transport that calls ``fn(call)`` (sync or async) instead of the network."""

    def __init__(self, fn: ResponseFn, models: Mapping[str, set[str]] | None = None) -> None:
        self.fn = fn
        self.models = models
        self.calls: list[Call] = []

    async def send(self, call: Call) -> Response:
        """Record the call and return ``fn(call)``."""
        self.calls.append(call)
        result = self.fn(call)
        # One type check rather than inspect.isawaitable's protocol probes per call.
        if type(result) is Response:
            return result
        if inspect.isawaitable(result):
            return await result
        return result

    async def list_models(self, provider: str) -> set[str] | None:
        """The ``models`` given at construction for ``provider`` (None: unknown)."""
        return None if self.models is None else self.models.get(provider)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


class AiohttpTransport:
    """One aiohttp session (keep-alive) to every configured provider.

    Timeouts and the watchdog deadline are virtual seconds, divided by each provider's
    ``time_scale`` on the wire; elapsed times in responses are virtual seconds.
    """

    def __init__(self, providers: Sequence[ProviderSettings],
                 stream: StreamSettings | None = None, limit: int = 256) -> None:
        self.providers = {p.name: p for p in providers}
        self.stream = stream if stream is not None else StreamSettings()
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        # each provider's GET /models answer, once: the reachability check and the
        # preflight's list of served models before a job read the same one
        self._models: dict[str, tuple[int, bytes]] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        """Close the session (idempotent)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AiohttpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self, provider: ProviderSettings) -> dict[str, str]:
        return {"Authorization": f"Bearer {provider.api_key}",
                "Content-Type": "application/json"}

    async def _get_models(self, provider: str) -> tuple[int, bytes]:
        """``GET {base_url}/models`` within 10 s: the status and the body (aiohttp's
        errors and the timeout raised as they come), fetched once per provider."""
        got = self._models.get(provider)
        if got is not None:
            return got
        p = self.providers[provider]
        async with self._get_session().get(
            f"{p.base_url}/models", headers=self._headers(p),
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            got = self._models[provider] = (resp.status, await resp.read())
        return got

    async def list_models(self, provider: str) -> set[str] | None:
        """``GET {base_url}/models``: the served model ids, None if the call fails."""
        try:
            status, body = await self._get_models(provider)
            data = json.loads(body) if status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):  # JSON or its encoding
            return None
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            return None
        return {str(m.get("id")) for m in models if isinstance(m, dict) and "id" in m}

    async def unreachable(self, provider: str) -> str | None:
        """Why ``provider`` cannot be reached at all (no connection to its host, or no
        answer within 10 s to ``GET {base_url}/models``); None when it answers anything."""
        try:
            await self._get_models(provider)
        except aiohttp.ClientConnectorError as exc:
            return str(exc.os_error.strerror or exc.os_error)
        except TimeoutError:
            return "no answer within 10 s"
        except aiohttp.ClientError:
            return None  # it answered, badly: the requests' own errors will say how
        return None

    async def send(self, call: Call) -> Response:
        """POST the call to ``{base_url}/chat/completions``; streams when ``call.stream``."""
        p = self.providers[call.provider]
        k = p.time_scale
        start = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=call.timeout_s / k)
        loop = asyncio.get_running_loop()
        # The watchdog's first-token deadline covers the wait for the response headers too
        # (a server may hold them until the first token); it is lifted at the first token.
        watchdog = asyncio.timeout_at(
            loop.time() + self.stream.first_token_s / k if call.stream else None)
        try:
            async with watchdog, self._get_session().post(
                f"{p.base_url}/chat/completions", data=json.dumps(call.body),
                headers=self._headers(p), timeout=timeout,
            ) as resp:
                headers = _lower(resp.headers)
                if call.stream and resp.status == 200:
                    return await self._read_stream(resp, headers, start, k, watchdog)
                watchdog.reschedule(None)
                body = await resp.text()
                return Response(resp.status, headers, body,
                                elapsed_s=(time.monotonic() - start) * k)
        except TimeoutError:
            kind: ErrorKind = "watchdog_first_token" if watchdog.expired() else "timeout"
            return Response(0, elapsed_s=(time.monotonic() - start) * k, error=kind)
        except aiohttp.ClientConnectorError:
            return Response(0, elapsed_s=(time.monotonic() - start) * k, error="connect")
        except (aiohttp.ClientError, ConnectionError):
            return Response(0, elapsed_s=(time.monotonic() - start) * k, error="reset")

    async def _read_stream(self, resp: aiohttp.ClientResponse, headers: dict[str, str],
                           start: float, k: float, watchdog: asyncio.Timeout) -> Response:
        """Read SSE chunks; cancel on a late first token (``watchdog``) or a repetition loop."""
        parts: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        ttft: float | None = None
        loop = LoopWatch(self.stream.loop_min_period, self.stream.loop_repeats)
        while True:
            line = await resp.content.readline()
            if not line:
                break
            text = line.decode().strip()
            if not text.startswith("data:"):
                continue
            payload = text[5:].strip()
            if payload == "[DONE]":
                break
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError:
                continue
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content")
                if piece:
                    if ttft is None:
                        ttft = (time.monotonic() - start) * k
                        watchdog.reschedule(None)
                    parts.append(piece)
                    if loop.feed(piece):
                        return Response(resp.status, headers,
                                        elapsed_s=(time.monotonic() - start) * k,
                                        ttft_s=ttft, error="watchdog_loop")
                finish = choice.get("finish_reason") or finish
            raw = chunk.get("usage")
            if isinstance(raw, dict):
                usage = Usage(int(raw.get("prompt_tokens", 0)),
                              int(raw.get("completion_tokens", 0)))
        return Response(resp.status, headers, content="".join(parts), finish_reason=finish,
                        usage=usage, elapsed_s=(time.monotonic() - start) * k, ttft_s=ttft)
