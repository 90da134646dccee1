"""The aiohttp shell that serves the pure provider model over OpenAI's HTTP API.

Every decision (admission, refusal, headers, latency, faults, usage, billing) is the
model's; this module only reads bodies, reads the clock, sleeps the durations the model
returned (virtual seconds / ``time_scale``), writes bytes and tells the model when each
response is over. See docs/conventions.md, "HTTP surface of the simulator".
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from aiohttp import web

from simulator import gc_tuning, wire
from simulator.loop import new_event_loop
from simulator.metrics import ShellCounters, render_metrics
from simulator.model.config import SimulatorConfig
from simulator.model.errors import error_body, server_error
from simulator.model.provider import Admission, Provider, Refusal, ResponsePlan

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
# json.loads without its wrappers (see _parse_json): the scanner of the default decoder
_SCAN: Callable[[str, int], tuple[object, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
# The routed paths, to tell a wrong method (405) from an unknown URL (404).
_ROUTE_PATTERNS = tuple(re.compile(p) for p in (
    r"(/p/[^/]+)?/v1/(chat/completions|embeddings|models)",
    r"/admin/[^/]+/(stats|topup|reset)",
    r"/metrics",
))
SSE_TYPE = "text/event-stream; charset=utf-8"
# A hold fault or a queued request may be sleeping at shutdown; don't wait for them.
SHUTDOWN_TIMEOUT_S = 0.5
class Clock:
    """Virtual time of a running server: ``time_scale * (monotonic() - start)`` seconds."""

    __slots__ = ("_start", "time_scale")

    def __init__(self, time_scale: float) -> None:
        self.time_scale = time_scale
        self._start = time.monotonic()

    def now(self) -> float:
        """Virtual seconds since the server started."""
        return self.time_scale * (time.monotonic() - self._start)

    async def sleep_until(self, virtual_t: float) -> None:
        """Sleep until virtual time ``virtual_t`` (no-op if it has passed)."""
        wall = (virtual_t - self.now()) / self.time_scale
        if wall > 0:
            await asyncio.sleep(wall)


@dataclass(slots=True)
class _Waiter:
    """A request queued by the model for a GPU slot; ``started_at`` is virtual seconds."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0


@dataclass(slots=True)
class _Sent:
    """Chunks (per choice) delivered so far; what ``finish`` is told when the reply ends."""

    chunks: int = 0


@dataclass(slots=True)
class _Served:
    """One provider as the shell serves it: the model plus the requests waiting on it."""

    provider: Provider
    waiters: dict[int, _Waiter] = field(default_factory=dict)
    # the shell's answer counts of this provider per endpoint (ShellCounters.statuses)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)


def build_providers(config: SimulatorConfig, *, epoch_s: float | None = None
                    ) -> dict[str, Provider]:
    """The model objects of a configuration, seeded as the live server seeds them.

    Every provider gets ``config.seed`` (each derives its own RNG streams from it and its
    name); ``epoch_s`` is the unix time of virtual 0 (the model's fixed default if None,
    the live server passes ``time.time()``). The planner and the equivalence test build
    theirs with this function so that they see the same random draws.
    """
    extra = {} if epoch_s is None else {"epoch_s": epoch_s}
    return {
        profile.name: Provider(profile, seed=config.seed, time_scale=config.time_scale,
                               **extra)
        for profile in config.providers
    }


def _api_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return request.headers.get("x-api-key") or None


def _error(status: int, message: str, type_: str = "invalid_request_error", *,
           code: str | None = None) -> web.Response:
    return _json(status, error_body(message, type_, None, code))


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=wire.dumps(body), content_type=JSON_TYPE,
                        headers=headers)


def _parse_json(raw: bytes) -> tuple[object, web.Response | None]:
    """The parsed body, or the OpenAI-shaped 400 that answers it."""
    try:
        text = raw.decode("utf-8")
        try:
            # the C scanner straight away: json.loads' layers around it cost more than
            # the scan of a typical body; anything it does not read whole (surrounding
            # whitespace, a BOM, an error) goes through json.loads for its verdict
            value, end = _SCAN(text, 0)
            if end == len(text):
                return value, None
        except (StopIteration, ValueError):
            pass
        return json.loads(text), None
    except UnicodeDecodeError:
        return None, _error(400, "The request body is not valid UTF-8.", code="invalid_body")
    except (ValueError, RecursionError):
        return None, _error(400, wire.INVALID_JSON_MESSAGE, code="invalid_json")


def _reset_connection(request: web.Request) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed upstream would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _close_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


class SimulatorApp:
    """The request handlers of one server: the providers, the clock and the counters."""

    def __init__(self, config: SimulatorConfig, providers: dict[str, Provider]) -> None:
        self.config = config
        self.clock = Clock(config.time_scale)
        self.counters = ShellCounters()
        self.served = {
            name: _Served(p, statuses={kind: self.counters.statuses(name, kind)
                                       for kind in ("chat", "embeddings")})
            for name, p in providers.items()
        }
        self.default_name = config.providers[0].name

    # -- routing ---------------------------------------------------------------------

    def build(self) -> web.Application:
        """The aiohttp application with every route of conventions.md."""
        app = web.Application(
            client_max_size=self.config.max_body_bytes
        )
        r = app.router
        for prefix in ("/v1", "/p/{provider}/v1"):
            # the model call itself (kind "chat" by default): no wrapper coroutine
            r.add_post(prefix + "/chat/completions", self._model_call)
            r.add_post(prefix + "/embeddings", self._embeddings)
            r.add_get(prefix + "/models", self._models)
        r.add_get("/admin/{provider}/stats", self._admin_stats)
        r.add_post("/admin/{provider}/topup", self._admin_topup)
        r.add_post("/admin/{provider}/reset", self._admin_reset)
        r.add_get("/metrics", self._metrics)
        r.add_route("*", "/{tail:.*}", self._no_route)
        return app

    async def _no_route(self, request: web.Request) -> web.StreamResponse:
        # A catch-all route rather than a middleware: aiohttp's own 404/405 are plain text
        # while OpenAI clients expect its error object, and a middleware would cost every
        # request a coroutine layer.
        known = any(pattern.fullmatch(request.path) for pattern in _ROUTE_PATTERNS)
        status, code = (405, "method_not_allowed") if known else (404, "unknown_url")
        return _error(status, f"Unknown request URL: {request.method} {request.path}.",
                      code=code)

    def _served_for(self, request: web.Request) -> _Served | None:
        name = request.match_info.get("provider", self.default_name)
        return self.served.get(name)

    def _unknown_provider(self, request: web.Request) -> web.Response:
        name = request.match_info.get("provider", "")
        return _error(404, f"Unknown provider {name!r}.", code="unknown_provider")

    async def _read_json(self, request: web.Request) -> tuple[object, web.Response | None]:
        """The parsed body, or the OpenAI-shaped 4xx that answers it."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None, self._too_large()
        return _parse_json(raw)

    def _too_large(self) -> web.Response:
        return _error(
            413, f"Request body too large: the limit is {self.config.max_body_bytes} bytes.",
            code="request_too_large",
        )

    # -- finishing and the GPU-slot queue ----------------------------------------------

    def _finish(self, served: _Served, admission: Admission, delivered: int) -> None:
        """Tell the model a response is over and wake the queued requests it started."""
        now = self.clock.now()
        started = served.provider.finish(now, admission, delivered)
        for other in started:
            waiter = served.waiters.get(other.id)
            if waiter is None:
                # Its handler is already gone: give the slot straight back.
                self._finish(served, other, 0)
                continue
            waiter.started_at = now
            waiter.event.set()

    async def _wait_for_slot(self, served: _Served, admission: Admission) -> float:
        """Wait until ``finish`` of another request starts this one; its virtual start."""
        waiter = _Waiter()
        served.waiters[admission.id] = waiter
        try:
            await waiter.event.wait()
        finally:
            del served.waiters[admission.id]
        return waiter.started_at

    # -- OpenAI endpoints --------------------------------------------------------------

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._model_call(request, "embeddings")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        served = self._served_for(request)
        if served is None:
            return self._unknown_provider(request)
        return _json(200, served.provider.models())

    async def _model_call(self, request: web.Request, kind: str = "chat"
                          ) -> web.StreamResponse:
        """``kind`` is "chat" (the route's handler itself) or "embeddings"."""
        served = self._served_for(request)
        if served is None:
            return self._unknown_provider(request)
        statuses = served.statuses[kind]
        # _read_json inline: one coroutine fewer on every request
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raw = None
        body, bad = _parse_json(raw) if raw is not None else (None, self._too_large())
        if bad is not None:
            statuses[bad.status] = statuses.get(bad.status, 0) + 1
            return bad
        now = self.clock.now()
        call = served.provider.chat if kind == "chat" else served.provider.embeddings
        result = call(now, _api_key(request), body)
        del body  # not held (with its lists and dicts) while the reply sleeps
        if isinstance(result, Refusal):
            statuses[result.status] = statuses.get(result.status, 0) + 1
            return _json(result.status, result.body, result.headers)
        sent = _Sent()
        try:
            t0 = now if result.plan is not None else await self._wait_for_slot(served, result)
            if kind == "embeddings":
                resp = await self._reply_embeddings(request, result, t0)
            elif result.stream:
                resp = await self._reply_stream(request, result, t0, sent)
            else:
                plan = result.plan
                if (plan is not None and plan.fault is None
                        and t0 + plan.ttft_s + sum(plan.itl_s) <= self.clock.now()):
                    # already due (zero latency): rendered here, no _reply_chat coroutine
                    resp = self._chat_response(result, plan, sent)
                else:
                    resp = await self._reply_chat(request, result, t0, sent)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            return resp
        finally:
            # Also on cancellation (the client left): the model settles what was sent.
            self._finish(served, result, sent.chunks)

    async def _held(self, request: web.Request, plan: ResponsePlan,
                    t0: float) -> web.Response | None:
        """Carry out a "hold" fault (a timeout, as the client sees it): nothing until the
        fault's virtual duration has passed, then the connection closes. None for any other
        plan."""
        fault = plan.fault
        if fault is None or fault.kind != "hold":
            return None
        await self.clock.sleep_until(t0 + fault.duration_s)
        _close_connection(request)
        return web.Response(status=504)

    async def _reply_chat(
        self, request: web.Request, admission: Admission, t0: float, sent: _Sent
    ) -> web.StreamResponse:
        """A non-stream completion: the whole body once the last chunk is due."""
        plan = admission.plan
        assert plan is not None
        fault = plan.fault
        if fault is None:
            due = t0 + plan.ttft_s + sum(plan.itl_s)
            if due > self.clock.now():  # no coroutine to create for a reply already due
                await self.clock.sleep_until(due)
        elif fault.kind == "hold":
            held = await self._held(request, plan, t0)
            assert held is not None
            return held
        elif fault.kind in ("reset", "error"):
            times = plan.chunk_times(t0)
            await self.clock.sleep_until(times[min(fault.at_chunk, len(times) - 1)])
            if fault.kind == "reset":
                _reset_connection(request)
                return web.Response(status=502)
            return _json(500, server_error(500), admission.headers)
        else:
            await self.clock.sleep_until(plan.chunk_times(t0)[-1])
        return self._chat_response(admission, plan, sent)

    @staticmethod
    def _chat_response(admission: Admission, plan: ResponsePlan, sent: _Sent) -> web.Response:
        """The 200 of a non-stream completion, all chunks counted as sent."""
        body = wire.chat_completion(
            admission.id, admission.created, admission.model, plan.text,
            plan.finish_reason, plan.usage, admission.n, plan.tool_call,
        )
        sent.chunks = plan.n_chunks
        return web.Response(body=body, content_type=JSON_TYPE, headers=admission.headers)

    async def _reply_stream(
        self, request: web.Request, admission: Admission, t0: float, sent: _Sent
    ) -> web.StreamResponse:
        """An SSE stream: role and first content at the TTFT, then one chunk per gap."""
        plan = admission.plan
        assert plan is not None
        fault = plan.fault
        held = await self._held(request, plan, t0)
        if held is not None:
            return held
        times = plan.chunk_times(t0)
        frames = wire.ChunkWriter(admission.id, admission.created, admission.model,
                                  admission.include_usage, admission.n)
        resp = web.StreamResponse(status=200, headers=admission.headers)
        resp.content_type = SSE_TYPE
        resp.headers["Cache-Control"] = "no-cache"
        cut = fault.at_chunk if fault is not None and fault.kind in ("reset", "error") else None
        tool = plan.tool_call
        try:
            n_chunks = plan.n_chunks
            for i in range(n_chunks + 1):
                await self.clock.sleep_until(times[min(i, len(times) - 1)])
                if i == cut and fault is not None and fault.kind == "reset":
                    _reset_connection(request)  # at 0: before any byte
                    return resp
                if i == 0:
                    await resp.prepare(request)
                    await resp.write(frames.role() if tool is None else
                                     frames.tool_start(tool, wire.tool_call_id(admission.id)))
                if i == cut:
                    await resp.write(frames.error())
                    return resp
                if i == n_chunks:
                    break
                await resp.write(frames.content(plan.chunks[i]) if tool is None else
                                 frames.tool_arguments(plan.chunks[i]))
                sent.chunks += 1
            await resp.write(frames.finish(plan.finish_reason))
            if admission.include_usage:
                await resp.write(frames.usage(plan.usage))
            await resp.write(wire.DONE_FRAME)
            sent.chunks = n_chunks
        except ConnectionError:
            # The client went away: finish() hears how much it received.
            log.debug("client left stream %s after %d chunks", admission.id, sent.chunks)
        return resp

    async def _reply_embeddings(
        self, request: web.Request, admission: Admission, t0: float
    ) -> web.StreamResponse:
        """The vectors once the (virtual) embedding time has passed."""
        plan = admission.plan
        assert plan is not None
        fault = plan.fault
        held = await self._held(request, plan, t0)
        if held is not None:
            return held
        await self.clock.sleep_until(plan.chunk_times(t0)[-1])
        if fault is not None and fault.kind == "reset":
            _reset_connection(request)
            return web.Response(status=502)
        if fault is not None and fault.kind == "error":
            return _json(500, server_error(500), admission.headers)
        reply = wire.embeddings_body(admission.inputs, admission.dims, admission.model,
                                     plan.usage, admission.encoding_format)
        return _json(200, reply, admission.headers)

    # -- admin and metrics -----------------------------------------------------------

    def _admin(self, request: web.Request) -> tuple[_Served | None, web.Response | None]:
        if _api_key(request) != self.config.admin_token:
            return None, _error(401, "Admin token missing or wrong.", "authentication_error",
                                code="invalid_admin_token")
        served = self.served.get(request.match_info["provider"])
        if served is None:
            return None, self._unknown_provider(request)
        return served, None

    async def _admin_stats(self, request: web.Request) -> web.StreamResponse:
        served, bad = self._admin(request)
        if bad is not None:
            return bad
        assert served is not None
        return _json(200, served.provider.stats())

    async def _admin_topup(self, request: web.Request) -> web.StreamResponse:
        served, bad = self._admin(request)
        if bad is not None:
            return bad
        assert served is not None
        body, bad = await self._read_json(request)
        if bad is not None:
            return bad
        key = body.get("key") if isinstance(body, dict) else None
        usd = body.get("usd") if isinstance(body, dict) else None
        if not isinstance(key, str) or isinstance(usd, bool) or not isinstance(usd, int | float):
            return _error(400, 'Expected {"key": string, "usd": number}.', code="invalid_topup")
        try:
            balance = served.provider.topup(key, float(usd))
        except KeyError:
            return _error(404, f"Unknown API key {key!r}.", code="unknown_key")
        except ValueError as exc:
            return _error(400, str(exc), code="invalid_topup")
        # an unlimited balance stays unlimited: JSON has no infinity, so null
        return _json(200, {"key": key, "balance_usd": balance if math.isfinite(balance) else None})

    async def _admin_reset(self, request: web.Request) -> web.StreamResponse:
        served, bad = self._admin(request)
        if bad is not None:
            return bad
        assert served is not None
        served.provider.reset(self.clock.now())
        return _json(200, {"reset": served.provider.name})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        text = render_metrics(self.counters, [s.provider.stats() for s in self.served.values()])
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})


@dataclass(slots=True)
class RunningServer:
    """A started simulator: its base ``url`` (``http://HOST:PORT``), port and providers."""

    url: str
    host: str
    port: int
    providers: dict[str, Provider]
    app: SimulatorApp
    _runner: web.AppRunner
    loop: asyncio.AbstractEventLoop

    def base_url(self, provider: str | None = None) -> str:
        """The OpenAI ``base_url`` of a provider (the first one's ``/v1`` by default)."""
        return f"{self.url}/v1" if provider is None else f"{self.url}/p/{provider}/v1"

    async def close(self) -> None:
        """Stop listening and drop the connections still open."""
        await self._runner.cleanup()


async def start_server(
    config: SimulatorConfig, *, host: str = "127.0.0.1", port: int = 0,
    tune_gc: bool = False,
) -> RunningServer:
    """Start the simulator on the running loop; ``port=0`` picks a free port.

    ``tune_gc`` applies ``simulator.gc_tuning.tune_for_serving`` once listening: a
    process-wide setting for a process that exists to serve (``ratelab serve``).
    """
    providers = build_providers(config, epoch_s=time.time())
    shell = SimulatorApp(config, providers)
    runner = web.AppRunner(
        shell.build(), handler_cancellation=True, access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    if tune_gc:
        gc_tuning.tune_for_serving()
    return RunningServer(
        url=f"http://{shown}:{bound}", host=host, port=bound, providers=providers, app=shell,
        _runner=runner, loop=asyncio.get_running_loop(),
    )


@contextmanager
def serve_in_thread(
    config: SimulatorConfig, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningServer]:
    """Run the simulator on its own event loop (``new_event_loop``) in a background thread,
    for sync callers."""
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ratelab-simulator", daemon=True)
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(
            start_server(config, host=host, port=port), loop
        ).result(timeout=30)
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
