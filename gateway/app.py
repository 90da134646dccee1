"""The gateway's HTTP surface (aiohttp): enqueue, poll, subscribe, pass-through, health.

Every decision is elsewhere (``requests`` validates, ``limits`` admits, the store keeps,
the workers run); this module reads bodies, answers with OpenAI-shaped JSON and SSE, and
turns an unreachable shared state into 503.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from gateway.clock import GatewayClock
from gateway.config import GatewayConfig
from gateway.events import EventHub, Metrics
from gateway.limits import LIMIT_TOO_BIG, refusal_message
from gateway.requests import BadRequest, TaskRequest, error_body, parse_items, parse_task
from gateway.state import (
    StateUnavailable,
    TaskRecord,
    TaskStore,
    UserLimiter,
)

SSE_POLL_S = 0.25   # wall seconds between store polls of an SSE subscriber (at most)
# With Redis another gateway process may run the task, and its events reach this process
# only through the store: poll it every half virtual second (a poller's default is 2 s).
SSE_SHARED_POLL_VIRTUAL_S = 0.5


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body, separators=(",", ":")),
                        content_type="application/json", headers=headers)


def unavailable(exc: StateUnavailable) -> web.Response:
    """503 with a clear message: nothing was accepted or changed."""
    return _json(503, error_body(
        f"The gateway's shared task state is unreachable ({exc}); nothing was accepted. "
        "Retry shortly.", "service_unavailable", "state_unavailable"), {"retry-after": "1"})


class GatewayApp:
    """Handlers over one store, limiter and worker pool (``wake`` on enqueue)."""

    def __init__(self, cfg: GatewayConfig, store: TaskStore, limiter: UserLimiter,
                 clock: GatewayClock, hub: EventHub, metrics: Metrics,
                 wake: Callable[[], None], backend: str,
                 ping: Callable[[], Any] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.limiter = limiter
        self.clock = clock
        self.hub = hub
        self.metrics = metrics
        self.wake = wake
        self.backend = backend
        self.ping = ping
        self.sse_poll_s = (SSE_POLL_S if backend == "sqlite"
                           else min(SSE_POLL_S, clock.wall(SSE_SHARED_POLL_VIRTUAL_S)))

    def build(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(client_max_size=self.cfg.max_body_bytes,
                              middlewares=[self._errors])
        app.router.add_post("/v1/tasks", self.create_task)
        app.router.add_get("/v1/tasks/{id}", self.get_task)
        app.router.add_get("/v1/tasks/{id}/events", self.task_events)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_view)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except StateUnavailable as exc:
            self.metrics.unavailable += 1
            return unavailable(exc)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except web.HTTPNotFound:
            return _json(404, error_body(f"No route {request.method} {request.path}.",
                                         "invalid_request_error", "unknown_url"))
        except web.HTTPMethodNotAllowed:
            return _json(405, error_body(f"Method {request.method} not allowed on "
                                         f"{request.path}.", "invalid_request_error",
                                         "method_not_allowed"))

    def _too_large(self) -> web.Response:
        return _json(413, error_body(
            f"Request body over the limit of {self.cfg.max_body_bytes:,} bytes.",
            "invalid_request_error", "request_too_large"))

    # ---------------------------------------------------------------- accept

    async def _body(self, request: web.Request) -> object:
        if (request.content_length or 0) > self.cfg.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.cfg.max_body_bytes,
                                                actual_size=request.content_length or 0)
        raw = await request.read()
        try:
            return json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(400, "invalid_json", f"The body is not valid JSON: {exc}.") from exc

    async def _read(self, request: web.Request, default_lane: str) -> TaskRequest:
        return parse_task(await self._body(request), request.headers, self.cfg, default_lane)

    async def _accept(self, req: TaskRequest, task_id: str | None = None
                      ) -> TaskRecord | web.Response:
        """Admit against the user's limits and store; the record, or a 429 response."""
        refused = await self._admit(req.user, req.tokens)
        if refused is not None:
            return refused
        return await self._store_task(req, task_id)

    async def _store_task(self, req: TaskRequest, task_id: str | None = None) -> TaskRecord:
        """Store an admitted task (committed before this returns) and wake a worker."""
        task = TaskRecord(task_id or TaskRecord.new_id(), req.user, self.cfg.tier_of(req.user),
                          req.lane, req.queue, req.body, req.tokens, self.clock.now())
        await self.store.put(task)
        self.metrics.accepted[req.lane] += 1
        self.wake()
        return task

    async def _admit(self, user: str, tokens: int) -> web.Response | None:
        """Take one request and ``tokens`` from ``user``'s buckets; None, or the 429."""
        tier_name = self.cfg.tier_of(user)
        tier = self.cfg.tiers[tier_name]
        now = self.clock.now()
        decision = await self.limiter.admit(user, tier, now, tokens)
        if not decision.allowed:
            self.metrics.refused[(tier_name, decision.limit)] += 1
            wall = self.clock.wall(decision.retry_in_s)
            # a request larger than a whole day's tokens never passes: no retry-after, and
            # the header the openai SDK (and the batching client) take as "do not retry"
            headers = ({"x-should-retry": "false"} if decision.limit == LIMIT_TOO_BIG else
                       {"retry-after": str(max(1, math.ceil(wall))),
                        "retry-after-ms": str(max(1, math.ceil(wall * 1000)))})
            return _json(429, error_body(
                refusal_message(user, tier_name, tier, decision, self.clock.time_scale),
                "user_rate_limit", "rate_limit_exceeded", "user", limit=decision.limit,
                tier=tier_name, user=user), headers)
        return None

    async def create_task(self, request: web.Request) -> web.Response:
        """``POST /v1/tasks``: 202 with the task id, 429 over a user limit, 4xx bad input."""
        try:
            body = await self._body(request)
            if isinstance(body, dict) and "items" in body:
                reqs = parse_items(body, request.headers, self.cfg, "background")
            else:
                reqs = []
                req = parse_task(body, request.headers, self.cfg, "background")
        except BadRequest as exc:
            return _json(exc.status, exc.body())
        if reqs:
            # a list of items: one request of the user's, its tokens admitted all at once
            refused = await self._admit(reqs[0].user, sum(r.tokens for r in reqs))
            if refused is not None:
                return refused
            tasks = await asyncio.gather(*[self._store_task(r) for r in reqs])
            return _json(202, {"object": "list", "data": [
                {"id": t.id, "object": "task", "state": "queued", "lane": t.lane}
                for t in tasks]})
        accepted = await self._accept(req)
        if isinstance(accepted, web.Response):
            return accepted
        return _json(202, {"id": accepted.id, "object": "task", "state": "queued",
                           "lane": accepted.lane},
                     {"Location": f"/v1/tasks/{accepted.id}"})

    # ---------------------------------------------------------------- read

    async def _task_or_404(self, request: web.Request) -> TaskRecord | web.Response:
        task_id = request.match_info["id"]
        task = await self.store.get(task_id)
        if task is None:
            return _json(404, error_body(f"No task with id {task_id!r}.",
                                         "invalid_request_error", "task_not_found", "id"))
        return task

    async def get_task(self, request: web.Request) -> web.Response:
        """``GET /v1/tasks/{id}``: state, and the result once done."""
        task = await self._task_or_404(request)
        if isinstance(task, web.Response):
            return task
        return _json(200, task.public())

    async def _follow(self, task_id: str, q: asyncio.Queue[dict[str, Any]],
                      deadline: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Events of a task from the hub, plus store polls (another process may run it),
        ending after the final state; each state appears once."""
        last_state = None
        while deadline is None or time.monotonic() < deadline:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can return a result when the
            # client's disconnect cancels this handler in the same turn, losing the cancel.
            try:
                async with asyncio.timeout(self.sse_poll_s):
                    event = await q.get()
            except TimeoutError:
                task = await self.store.get(task_id)
                if task is None:
                    return
                event = {"state": task.state}
                if task.result is not None:
                    event["result"] = task.result
                if task.error is not None:
                    event["error"] = task.error
            state = event.get("state")
            if state is not None:
                if state == last_state:
                    continue
                last_state = state
            yield event
            if state in ("done", "failed", "dead_lettered"):
                return

    async def task_events(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/tasks/{id}/events``: SSE of state changes (``event: state``) and tokens
        (``event: token``) until the task is final, then ``event: end``; ``event: restart``
        says the tokens so far belong to a failed attempt (the reply starts over)."""
        task_id = request.match_info["id"]
        q = self.hub.subscribe(task_id)
        replay = self.hub.tokens(task_id)  # same tick as subscribe: no token lost or doubled
        try:
            task = await self._task_or_404(request)
            if isinstance(task, web.Response):
                return task
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            current = {"state": task.state,
                       **({"result": task.result} if task.result else {}),
                       **({"error": task.error} if task.error else {})}
            # Replay the tokens streamed before we subscribed, in order; the current state
            # first unless it is final (then every token belongs before it).
            fresh = []
            while not q.empty():
                fresh.append(q.get_nowait())
            ordered = [*replay, *fresh, current] if task.final else [current, *replay, *fresh]
            for event in ordered:
                q.put_nowait(event)
            async for event in self._follow(task_id, q):
                kind = ("token" if "token" in event else
                        "restart" if "restart" in event else "state")
                await resp.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())
            await resp.write(b"event: end\ndata: {}\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.hub.unsubscribe(task_id, q)

    # ---------------------------------------------------------------- pass-through

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: enqueue (interactive lane by default) and wait;
        answers what the provider answered, streamed as OpenAI chunks when asked."""
        try:
            req = await self._read(request, "interactive")
        except BadRequest as exc:
            return _json(exc.status, exc.body())
        if "item" in req.body:
            return _json(400, error_body("Item tasks go to POST /v1/tasks.",
                                         "invalid_request_error", "invalid_item", "item"))
        task_id = TaskRecord.new_id()
        q = self.hub.subscribe(task_id)
        try:
            accepted = await self._accept(req, task_id)
            if isinstance(accepted, web.Response):
                return accepted
            wait_s = self.clock.wall(self.cfg.request_timeout_s * self.cfg.max_attempts) + 5
            deadline = time.monotonic() + wait_s
            stream: web.StreamResponse | None = None
            final: dict[str, Any] | None = None
            async for event in self._follow(task_id, q, deadline):
                if "token" in event and req.stream:
                    if stream is None:
                        stream = await self._start_stream(request, task_id)
                    await stream.write(_chunk(task_id, event["token"], None,
                                              event.get("tool_calls")))
                elif "restart" in event and stream is not None:
                    # chunks sent cannot be taken back: the caller gets an error rather
                    # than one reply run into another (the task's result is still stored)
                    return await _end_stream(stream, error_body(
                        f"The upstream stream failed after part of the reply was sent "
                        f"({event.get('reason')}); the task is retried and its result will "
                        f"be at /v1/tasks/{task_id}.", "upstream_error", "stream_restarted"))
                elif event.get("state") in ("done", "failed", "dead_lettered"):
                    final = event
            return await self._chat_answer(request, task_id, final, stream, req.stream)
        finally:
            self.hub.unsubscribe(task_id, q)

    async def _start_stream(self, request: web.Request, task_id: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "x-ratelab-task-id": task_id})
        await resp.prepare(request)
        return resp

    async def _chat_answer(self, request: web.Request, task_id: str,
                           final: dict[str, Any] | None, stream: web.StreamResponse | None,
                           wants_stream: bool) -> web.StreamResponse:
        if final is None:
            return _json(504, error_body(f"Task {task_id} did not finish in time; poll "
                                         f"/v1/tasks/{task_id}.", "timeout", "gateway_timeout"))
        if final["state"] != "done":
            if stream is not None:  # the 200 and some chunks are sent: the error ends them
                return await _end_stream(stream, {"error": final.get("error")
                                                  or {"message": "failed"}})
            task = await self.store.get(task_id)
            status = (task.status if task is not None and task.status else 502)
            return _json(status if status >= 400 else 502,
                         {"error": final.get("error") or {"message": "failed"}})
        result = final.get("result") or {}
        if not wants_stream:
            return _json(200, result, {"x-ratelab-task-id": task_id})
        choice = (result.get("choices") or [{}])[0]
        if stream is None:
            # Ran elsewhere (or tokens were not seen here): one chunk with the whole reply.
            stream = await self._start_stream(request, task_id)
            message = choice.get("message") or {}
            calls = message.get("tool_calls")
            await stream.write(_chunk(task_id, message.get("content") or "", None, [
                {"index": i, **call} for i, call in enumerate(calls)] if calls else None))
        # the provider's reason: "length" says the reply was cut, "tool_calls" that it calls
        await stream.write(_chunk(task_id, None, choice.get("finish_reason") or "stop"))
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream

    # ---------------------------------------------------------------- ops

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: 200 when the state answers, 503 otherwise."""
        if self.ping is not None:
            try:
                await self.ping()
            except StateUnavailable as exc:
                return _json(503, {"status": "unavailable", "backend": self.backend,
                                   "detail": str(exc)})
        return _json(200, {"status": "ok", "backend": self.backend})

    async def metrics_view(self, request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus text, or JSON with ``?format=json``."""
        try:
            depths = await self.store.depths()
        except StateUnavailable:
            depths = None
        if request.query.get("format") == "json":
            snap = self.metrics.snapshot(depths)
            budget = self.cfg.lanes.interactive_p95_budget_s
            p95 = self.metrics.latency("interactive")["p95"]
            snap["interactive_p95_budget_s"] = budget
            snap["interactive_p95_within_budget"] = p95 <= budget
            return _json(200, snap)
        return web.Response(text=self.metrics.prometheus(depths), content_type="text/plain")


async def _end_stream(stream: web.StreamResponse, error: dict[str, Any]) -> web.StreamResponse:
    """End a started pass-through stream with an error event, as OpenAI does mid-stream
    (``data: {"error": ...}``, no ``[DONE]``: the openai SDK raises ``APIError``)."""
    await stream.write(f"data: {json.dumps(error, separators=(',', ':'))}\n\n".encode())
    await stream.write_eof()
    return stream


def _chunk(task_id: str, content: str | None, finish: str | None,
           tool_calls: list[Any] | None = None) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    if tool_calls:
        if not content:
            delta.pop("content", None)  # a call alone: no empty text beside it
        delta["tool_calls"] = tool_calls
    data = {"id": f"chatcmpl-{task_id}", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
