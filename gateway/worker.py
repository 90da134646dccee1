"""The worker pool: leases tasks (interactive first), picks an upstream (``routing``: the
batching client's failover order and breakers), paces the call through that upstream's
window (``pacing``: the batching client's throttle) and calls it with the batching client's
transport, retry and classification policy; ``item`` tasks of the background lane are
packed with semantic batching (``batchclient.policy.packing``/``parsing``).

An upstream that refuses for its balance or key (402, 401) leaves the rotation
(``gateway.routing``): the call goes on at once to another upstream that serves its model.
With none left the tasks go back to their queue, no attempt counted, and workers claim
nothing until an upstream may be probed again: a gateway whose balance ran dry holds its
queue, and a top-up lets it go on, rather than failing every task.

Lane protection: the first ``lanes.reserved_workers`` workers only ever take interactive
tasks, and background calls may fill only ``lanes.background_ceiling`` of the provider
window, so a background flood leaves room for a waiting user.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import sqlite3
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from batchclient.config import RetrySettings, Task
from batchclient.cost import CostMeter
from batchclient.policy.classify import Classified, Verdict, classify
from batchclient.policy.job import cache_key, task_digest
from batchclient.policy.packing import Packer
from batchclient.policy.parsing import parse_reply, read_completion
from batchclient.policy.retry import retry_delay
from batchclient.policy.wire import Call, Item, Response
from batchclient.transport import Transport
from gateway.clock import GatewayClock
from gateway.config import GatewayConfig, Upstream
from gateway.events import EventHub, Metrics
from gateway.pacing import PacedCall
from gateway.routing import FATAL, Router
from gateway.state import ItemCache, ProviderWindow, StateUnavailable, TaskRecord, TaskStore
from gateway.upstream import completion_from_stream, stream_chat

log = logging.getLogger(__name__)

# Gateway-only fields of a task body, never forwarded upstream.
GATEWAY_FIELDS = ("lane", "batchable", "item")
IDLE_POLL_S = 0.05      # wall seconds an idle worker waits before looking again
PAUSE_POLL_S = 0.25     # wall seconds between looks while every upstream is out of rotation
STATE_RETRY_S = 0.2     # wall seconds between attempts while Redis is away
RETRY = RetrySettings(base_s=0.5, cap_s=30.0)


def worker_queues(cfg: GatewayConfig, index: int) -> tuple[str, ...]:
    """Queues worker ``index`` claims from, in priority order."""
    if not cfg.lanes.enabled:
        return ("shared", "batch")
    # At least one worker always takes background work, whatever the configuration says.
    if index < min(cfg.lanes.reserved_workers, cfg.workers - 1):
        return ("interactive",)
    return ("interactive", "batch", "background")


def upstream_body(task: TaskRecord, cfg: GatewayConfig) -> dict[str, Any]:
    """The chat body sent to the provider: gateway fields removed, model and max_tokens set
    (so the provider reserves what the gateway's window counted)."""
    body = {k: v for k, v in task.body.items() if k not in GATEWAY_FIELDS}
    body["model"] = body.get("model") or cfg.upstream.models[0]
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = cfg.default_max_tokens
    body.pop("stream_options", None)
    body["stream"] = False
    return body


class WorkerPool:
    """``cfg.workers`` asyncio workers over one store, one window per upstream (by name) and
    one transport to every upstream."""

    def __init__(self, cfg: GatewayConfig, store: TaskStore,
                 windows: Mapping[str, ProviderWindow], transport: Transport,
                 clock: GatewayClock, hub: EventHub, metrics: Metrics, *, seed: int = 0,
                 router: Router | None = None, cache: ItemCache | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.windows = windows
        self.upstreams = {u.name: u for u in cfg.upstreams}
        self.router = router or Router(cfg.upstreams, cfg.breaker, cfg.time_scale,
                                        cfg.probe_s)
        self.transport = transport
        self.clock = clock
        self.hub = hub
        self.metrics = metrics
        metrics.out_of_rotation = self.router.out_reasons
        metrics.costs = {u.name: CostMeter({u.name: u.prices}, u.low_balance_usd)
                         for u in cfg.upstreams}
        self.rng = random.Random(seed)
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: deque[asyncio.Future[None]] = deque()
        # Set by close(): a worker stops at its next turn even if something it awaited
        # swallowed the cancellation (seen on Python 3.11: a worker cancelled by close()
        # went on polling, and close() waited for it forever; a cancel that races a
        # timeout can come back as the timeout).
        self._stopping = False
        self._call_ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self.cache = cache if cfg.batching.cache else None
        b = cfg.batching
        # items a call may pack: halved when a batch is refused for its size, as the
        # batching client does
        self.max_items = b.max_items
        self.batch_task = Task("gateway", b.system_prompt, b.labels, cfg.upstream.models[0],
                               instructions=b.instructions)
        self.packer = Packer(self.batch_task)
        self._digest = task_digest(self.batch_task)

    def start(self) -> None:
        """Start the workers on the running loop (again after ``close()``)."""
        self._stopping = False
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._worker(i), name=f"gateway-worker-{i}")
                       for i in range(self.cfg.workers)]

    async def close(self) -> None:
        """Stop the workers; tasks they held stay leased and are re-queued later."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()

    def _check_stopping(self) -> None:
        """End a worker's inner retry loop once close() began, as its cancellation would
        have (close() waits for every worker; see ``_stopping``)."""
        if self._stopping:
            raise asyncio.CancelledError

    def wake(self) -> None:
        """Wake one idle worker (a task was queued)."""
        while self._idle:
            fut = self._idle.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _wait_for_work(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(fut)
        # Not asyncio.wait_for: on Python 3.11 it returns the future's result when a wake()
        # and a cancel() land in the same loop turn, swallowing the cancel, and close() then
        # waits forever for a worker that goes on polling. asyncio.wait always propagates it.
        try:
            await asyncio.wait((fut,), timeout=IDLE_POLL_S)
        finally:
            if not fut.done():
                fut.cancel()  # wake() skips it: a stale waiter never takes a wake-up

    async def _worker(self, index: int) -> None:
        queues = worker_queues(self.cfg, index)
        while not self._stopping:
            paused = self.router.paused_s(self.clock.now())
            if paused is not None:
                # every upstream refused for its balance or key: leave the tasks queued
                await asyncio.sleep(min(self.clock.wall(paused), PAUSE_POLL_S))
                continue
            try:
                tasks = await self.store.claim(queues, self.clock.now(), self.cfg.lease_s,
                                               self.max_items)
            except StateUnavailable:
                await asyncio.sleep(STATE_RETRY_S)
                continue
            if not tasks:
                await self._wait_for_work()
                continue
            for task in tasks:
                self.hub.publish(task.id, {"state": "running", "attempts": task.attempts})
            try:
                if tasks[0].queue == "batch":
                    await self._run_batch(tasks)
                else:
                    await self._run_one(tasks[0])
            except Exception as exc:  # a bug must not kill the worker nor strand the task
                log.exception("gateway worker %d: task %s failed", index, tasks[0].id)
                for task in tasks:
                    if not task.final:
                        task.state = "failed"
                        task.error = {"type": "internal_error", "code": "worker_error",
                                      "message": f"{type(exc).__name__}: {exc}"}
                        await self._save(task, final=True)

    # ------------------------------------------------------------------ helpers

    def _ceiling(self, task: TaskRecord) -> float:
        if not self.cfg.lanes.enabled or task.lane == "interactive":
            return 1.0
        return self.cfg.lanes.background_ceiling

    def _paced(self, task: TaskRecord, model: str, tokens: int, max_tokens: int,
               expected: int) -> PacedCall:
        """One call of ``task`` (``tokens`` with its ``max_tokens``) under a fresh key: a
        waiting user's may fill the window at once, background work is graduated."""
        return PacedCall(next(self._call_ids), model, tokens - max_tokens, max_tokens,
                         expected, self._ceiling(task), task.lane != "interactive")

    async def _route(self, paced: PacedCall, avoid: Sequence[str] = ()) -> Upstream | None:
        """The upstream this call goes to, once its window admitted (reserved) the call:
        the router's choice (``avoid``: upstreams that just failed it); a full window marks
        its upstream rate limited, so one with ``failover_on_429`` hands the call on. None
        when every upstream serving the model is out of the rotation (402, 401)."""
        model = paced.model
        while True:
            self._check_stopping()
            now = self.clock.now()
            if not self.router.in_rotation(now, model):
                return None
            name = self.router.choose(now, model, avoid)
            if name is None:   # every breaker is open: wait for one to let a probe through
                await asyncio.sleep(min(self.clock.wall(self.router.wait_s(now)), 0.25))
                continue
            tried: set[str] = set()
            wait = 0.0
            while name is not None and name not in tried:
                tried.add(name)
                try:
                    wait = await self.windows[name].acquire(now, paced)
                except StateUnavailable:
                    wait = -1.0
                    break
                if wait <= 0:
                    return self.upstreams[name]
                try:
                    full = await self.windows[name].room(now, paced) > 0
                except StateUnavailable:
                    full = True
                if not full:
                    break   # only the graduated steps space it: wait here, not elsewhere
                self.router.limited(now, name, now + wait)
                name = self.router.choose(now, model, avoid)
            if wait < 0:
                await asyncio.sleep(STATE_RETRY_S)
            else:
                await asyncio.sleep(min(self.clock.wall(wait), 0.25))

    def _fresh_upstream(self, model: str, avoid: Sequence[str]) -> bool:
        """Whether an upstream that has not failed this call (not in ``avoid``) can take it
        now; else the caller backs off and tries them all again."""
        choice = self.router.choose(self.clock.now(), model, avoid)
        return choice is not None and choice not in avoid

    async def _hold(self, tasks: Sequence[TaskRecord], model: str) -> None:
        """Back to the queue, no attempt counted: no upstream in the rotation serves their
        model. The worker then waits for that model's next probe (at most a short poll), so
        it does not claim the same tasks again at once while other models' work goes on."""
        for task in tasks:
            task.attempts -= 1
            await self._save(task, final=False, back=True)
        wait = self.router.probe_in(self.clock.now(), model)
        await asyncio.sleep(min(self.clock.wall(wait), PAUSE_POLL_S) or IDLE_POLL_S)

    async def _save(self, task: TaskRecord, *, final: bool, back: bool = False) -> None:
        """Store the outcome, retrying while the state is away (the result is never lost);
        a task not final goes back to its queue (to its ``back``: ``TaskStore.requeue``)."""
        while True:
            try:
                if final:
                    stored = await self.store.finish(task, self.clock.now())
                else:
                    await self.store.requeue(task, self.clock.now(), back)
                    stored = False
                break
            except StateUnavailable:
                self._check_stopping()  # the task stays leased: re-queued after its lease
                await asyncio.sleep(STATE_RETRY_S)
        if final and stored:
            self.metrics.finished[(task.lane, task.state)] += 1
            self.metrics.observe_latency(task.lane, self.clock.now() - task.created)
            event: dict[str, Any] = {"state": task.state}
            if task.result is not None:
                event["result"] = task.result
            if task.error is not None:
                event["error"] = task.error
            self.hub.publish(task.id, event)
        elif not final:
            self.hub.publish(task.id, {"state": "queued", "misses": task.misses})

    def _charge(self, up: Upstream, model: str, response: Response,
                tasks: Sequence[TaskRecord]) -> None:
        """Meter one answer (its charge header, else usage x the upstream's prices), shared
        evenly by the tasks it served; warn once as the balance falls below the threshold."""
        meter = self.metrics.costs[up.name]
        usage = response.usage
        if (usage is None and up.prices and 200 <= response.status < 300
                and "x-mdb-charged-usd" not in response.headers):
            usage = read_completion(response.body)[2]
        share = meter.charge(up.name, model, tasks[0].lane, response.headers,
                             usage) / len(tasks)
        for task in tasks:
            self.metrics.cost_by_user[task.user] += share
        if meter.low_balance_crossed():
            log.warning("gateway: upstream %s balance %.6f USD is below %.6f USD",
                        up.name, meter.balance_usd, up.low_balance_usd)

    async def _send(self, up: Upstream, task: TaskRecord, body: dict[str, Any],
                    paced: PacedCall, attempt: int, item_ids: tuple[str, ...] = (),
                    tasks: Sequence[TaskRecord] = ()) -> tuple[Response, Classified]:
        """Call ``up``; the response and its verdict, fed to the router's breaker, to the
        upstream's window (settled to the answer's usage and headers) and to the cost
        meter (``tasks``: the tasks a packed call serves, else ``task``)."""
        sent_at = self.clock.now()
        self.router.on_dispatch(sent_at, up.name)
        if task.body.get("stream") and not item_ids and self._session is not None:
            body = {**body, "stream": True}
            response = await stream_chat(
                self._session, up.base_url, up.api_key, body, self.cfg.request_timeout_s,
                self.cfg.time_scale, self.cfg.stream,
                lambda event: self.hub.publish(task.id, event))
        else:
            call = Call(paced.key, up.name, str(body["model"]), item_ids, body, paced.prompt,
                        paced.max_tokens, paced.prompt + paced.max_tokens, attempt,
                        self.cfg.request_timeout_s, lane="interactive"
                        if task.lane == "interactive" else "background")
            response = await self.transport.send(call)
        verdict = classify(response, self.cfg.time_scale)
        self._charge(up, str(body["model"]), response, tasks or (task,))
        now = self.clock.now()
        self.router.on_answer(now, up.name, verdict, response.status, sent_at)
        if verdict.verdict in FATAL:
            log.warning("gateway: upstream %s out of the rotation for %g virtual s, then "
                        "probed: %s", up.name, self.cfg.probe_s, verdict.reason)
        await self.windows[up.name].settle(now, paced, response, verdict)  # local: no I/O
        if verdict.rate_limited:
            until = now + (verdict.retry_after_s or 1.0)
            self.router.limited(now, up.name, until)
            if verdict.verdict == Verdict.RETRY:
                # every call to this upstream waits out the retry-after, the other tasks'
                # and, through Redis, the other processes' too: not one more 429 each (a
                # 429 "too large" says nothing of the window: it holds nothing)
                # (the shared state away: the router's mark and the window's own wait remain)
                with contextlib.suppress(StateUnavailable):
                    await self.windows[up.name].hold(until)
        self.metrics.upstream_calls[response.status] += 1
        self.metrics.upstream_calls_by[(up.name, response.status)] += 1
        return response, verdict

    # ------------------------------------------------------------------ one task

    async def _run_one(self, task: TaskRecord) -> None:
        if task.body.get("stream") and task.attempts > 1:
            # an earlier run (its process gone, its lease out) may have streamed tokens
            self.hub.publish(task.id, {"restart": True, "reason": "the task runs again"})
        body = upstream_body(task, self.cfg)
        model = str(body["model"])
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens")
                         or self.cfg.default_max_tokens)
        attempt = 0
        avoid: tuple[str, ...] = ()
        while True:
            # the reply's length is unknown: where the provider counts actual usage, its
            # max_tokens is reserved all the same until the answer settles it
            paced = self._paced(task, model, task.tokens, max_tokens, max_tokens)
            up = await self._route(paced, avoid)
            if up is None:
                await self._hold([task], model)
                return
            response, verdict = await self._send(up, task, body, paced, attempt)
            if verdict.verdict in FATAL:
                # that upstream left the rotation: the next one, or back to the queue
                continue
            if verdict.verdict == Verdict.OK:
                task.state, task.status = "done", response.status
                if response.content is not None and not response.body:
                    task.result = completion_from_stream(response, str(body["model"]),
                                                         task.id)
                else:
                    task.result = json.loads(response.body)
                break
            attempt += 1
            if verdict.verdict == Verdict.RETRY and attempt < self.cfg.max_attempts:
                if task.body.get("stream") and response.ttft_s is not None:
                    # this attempt's tokens reached subscribers: the next one streams anew
                    self.hub.publish(task.id, {"restart": True, "reason": verdict.reason})
                # As the batching client's interactive lane: straight to another upstream
                # when one can take it, else back off (full jitter) and try them all again.
                avoid = (*avoid, up.name)
                if not self._fresh_upstream(model, avoid):
                    avoid = ()
                    await self.clock.sleep(retry_delay(attempt - 1, self.rng, RETRY,
                                                       verdict.retry_after_s))
                continue
            task.status = response.status or None
            if verdict.verdict == Verdict.RETRY:
                task.state = "dead_lettered"
                task.error = {"type": "upstream_error", "code": "retries_exhausted",
                              # calls, not the task's ``attempts`` (its leases, one here)
                              "message": f"gave up after {attempt} calls to the upstreams "
                                         f"(max_attempts): {verdict.reason}"}
            else:
                task.state = "failed"
                task.error = _upstream_error(response, verdict.reason)
            break
        await self._save(task, final=True)

    # ------------------------------------------------------------------ packed items

    async def _answer_cached(self, tasks: Sequence[TaskRecord], model: str
                             ) -> tuple[list[TaskRecord], dict[str, str]]:
        """Finish the tasks whose item the cache answers; the others, and their keys."""
        keys = {t.id: cache_key(str(t.body["item"]["text"]), self.batch_task, model,
                                self._digest) for t in tasks}
        assert self.cache is not None
        try:
            codes = await self.cache.cached_codes(list(keys.values()))
        except StateUnavailable:
            return list(tasks), keys   # the cache away: pay rather than wait for it
        labels = self.cfg.batching.labels
        fresh = []
        for task in tasks:
            code = codes.get(keys[task.id])
            if code is None or code not in labels:
                fresh.append(task)
                continue
            task.state = "done"
            task.result = {"id": task.body["item"].get("id"), "code": code,
                           "label": labels[code], "cached": True}
            self.metrics.cache_hits += 1
            await self._save(task, final=True)
        return fresh, keys

    async def _run_batch(self, tasks: Sequence[TaskRecord]) -> None:
        b = self.cfg.batching
        model = str(tasks[0].body.get("model") or self.cfg.upstream.models[0])
        keys: dict[str, str] = {}
        if self.cache is not None:
            tasks, keys = await self._answer_cached(tasks, model)
            if not tasks:
                return
        items = [Item(t.id, str(t.body["item"]["text"])) for t in tasks]
        n = max(1, self.packer.pack(items, self.max_items, b.token_budget))
        for task in tasks[n:]:
            task.attempts -= 1  # not sent: the claim did not cost it an attempt
            await self._save(task, final=False)
        tasks, items = list(tasks[:n]), items[:n]
        max_tokens = self.packer.max_tokens(items)
        body: dict[str, Any] = {"model": model, "messages": self.packer.messages(items),
                                "max_tokens": max_tokens, "temperature": 0}
        tokens = self.packer.prompt_tokens(items) + max_tokens
        avoid: tuple[str, ...] = ()
        while True:
            paced = self._paced(tasks[0], model, tokens, max_tokens,
                                max_tokens - self.packer.reply_slack_tokens)
            up = await self._route(paced, avoid)
            if up is None:
                await self._hold(tasks, model)
                return
            response, verdict = await self._send(up, tasks[0], body, paced,
                                                 tasks[0].attempts - 1,
                                                 tuple(i.id for i in items), tasks)
            if verdict.verdict in FATAL:
                continue  # that upstream left the rotation: the next one, or the queue
            if verdict.verdict != Verdict.RETRY:
                break
            # failed here: at once to an upstream that has not failed it yet (same lease)
            avoid = (*avoid, up.name)
            if not self._fresh_upstream(model, avoid):
                break
        if verdict.verdict == Verdict.OK:
            content, finish, _ = read_completion(response.body)
            parsed = parse_reply(content or "", [i.id for i in items], b.labels, finish)
            for task in tasks:
                code = parsed.codes.get(task.id)
                if code is not None:
                    task.state, task.status = "done", response.status
                    task.result = {"id": task.body["item"].get("id"), "code": code,
                                   "label": b.labels[code]}
                    await self._save(task, final=True)
                    continue
                task.misses += 1
                if task.misses >= b.max_misses:
                    task.state = "dead_lettered"
                    task.error = {"type": "upstream_error", "code": "item_never_answered",
                                  "message": f"no reply answered the item in {task.misses} "
                                             "tries (the last: "
                                             f"{parsed.why_unanswered(task.id)})"}
                    await self._save(task, final=True)
                else:
                    await self._save(task, final=False)
            if self.cache is not None and parsed.codes:
                # after the results are saved: a cache that fails loses only the cache
                try:
                    await self.cache.remember_codes([(keys[t.id], parsed.codes[t.id], model)
                                                     for t in tasks if t.id in parsed.codes])
                except (StateUnavailable, sqlite3.Error) as exc:
                    log.warning("gateway: the item cache did not take a reply: %s", exc)
            return
        if verdict.too_large and len(items) > 1:
            # refused for its size (context length, a per-request cost cap): the batch, not
            # its items, is at fault; halve it and send them again in smaller ones
            self.max_items = min(self.max_items, max(1, len(items) // 2))
            await self._hold(tasks, model)
            return
        retryable = verdict.verdict == Verdict.RETRY
        if retryable:
            await self.clock.sleep(retry_delay(tasks[0].attempts - 1, self.rng, RETRY,
                                               verdict.retry_after_s))
        for task in tasks:
            if retryable and task.attempts < self.cfg.max_attempts:
                await self._save(task, final=False)
                continue
            task.status = response.status or None
            task.state = "dead_lettered" if retryable else "failed"
            task.error = _upstream_error(response, verdict.reason)
            await self._save(task, final=True)


def _upstream_error(response: Response, reason: str) -> dict[str, Any]:
    """The provider's OpenAI error object when it sent one, else one built from ``reason``."""
    try:
        data = json.loads(response.body) if response.body else None
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return dict(data["error"])
    return {"type": "upstream_error", "code": response.error or f"http_{response.status}",
            "message": reason}
