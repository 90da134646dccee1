"""The asyncio driver of the engine over a transport, a job store, a cache and a clock.

It validates everything before the first request, feeds the engine page by page, sends
what it asks, commits results after every batch, stops dispatch on a fatal answer (402,
401) while in-flight requests finish, and returns a ``JobResult`` whose ``exit_status``
follows docs/conventions.md.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from operator import attrgetter

from batchclient.cache import ResultCache
from batchclient.clock import Clock, ScaledClock
from batchclient.config import ClientConfig, Task
from batchclient.cost import SpendBudget
from batchclient.events import Event, EventHook
from batchclient.policy.classify import Classified
from batchclient.policy.engine import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    Done,
    Engine,
    InputError,
    ItemResult,
    Send,
    Wait,
    cache_key,
    task_digest,
)
from batchclient.policy.lanes import LanePolicy
from batchclient.policy.routing import Predicate, route_model
from batchclient.policy.state import Accepted
from batchclient.policy.userlimits import UserDecision, UserLimits
from batchclient.policy.wire import Call, Response
from batchclient.progress import ProgressSnapshot
from batchclient.store import JobStore, TaskRecord
from batchclient.transport import Transport

WIRE_LATENCY_WALL_S = 0.02

# an item state's id, read for a whole reply by a C-level map
_ID = attrgetter("id")


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a run ended: exit status, item counts (they add up to ``total``), requests,
    429s, cost in USD and virtual seconds elapsed."""

    exit_status: int
    total: int
    done: int
    dead: int
    pending: int
    cached: int
    requests: int
    rate_limited: int
    errors: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    elapsed_s: float
    reason: str = ""

    @property
    def cost_per_item_usd(self) -> float:
        """Cost of this run divided by the items it finished."""
        return self.cost_usd / self.done if self.done else 0.0


def _expand(results: list[ItemResult | Accepted], labels: Mapping[str, str]
            ) -> list[ItemResult]:
    """One ItemResult per item, Accepted records expanded (for the result cache)."""
    out: list[ItemResult] = []
    for result in results:
        if type(result) is Accepted:
            out.extend(result.results(labels))
        else:
            assert isinstance(result, ItemResult)
            out.append(result)
    return out


class Runner:
    """Runs one job to completion (or to a clean stop). Use ``await runner.run()``."""

    def __init__(
        self,
        task: Task,
        config: ClientConfig,
        transport: Transport,
        store: JobStore,
        *,
        cache: ResultCache | None = None,
        clock: Clock | None = None,
        on_event: EventHook | None = None,
        on_low_balance: Callable[[float], None] | None = None,
        on_progress: Callable[[ProgressSnapshot], None] | None = None,
        progress_every_s: float = 0.5,
        predicates: Iterable[tuple[Predicate, str]] = (),
        user_limits: UserLimits | None = None,
        lanes: LanePolicy | None = None,
        keep_open: bool = False,
        rebind_task: bool = False,
        spend: SpendBudget | None = None,
        topups: Iterable[float] = (),
    ) -> None:
        self.task = task
        if config.time_scale > 1.0:
            # Wire and event-loop latency (~20 ms of wall time) is k times longer in virtual
            # time: keep our window entries that much past the provider's.
            margin = max(config.throttle.expiry_margin_s, WIRE_LATENCY_WALL_S * config.time_scale)
            config = replace(config, throttle=replace(config.throttle, expiry_margin_s=margin))
        self.config = config
        self.transport = transport
        self.store = store
        self.cache = cache
        self.clock: Clock = clock if clock is not None else ScaledClock(config.time_scale)
        self.on_event = on_event
        self.on_low_balance = on_low_balance
        self.on_progress = on_progress
        self.progress_every_s = progress_every_s
        self.predicates = tuple(predicates)
        self.user_limits = user_limits
        self.lanes = lanes
        self.keep_open = keep_open
        # a spend cap shared with the process's other runners (else the config's own)
        self.spend = spend
        # continue a job whose task changed since it started (else preflight refuses it)
        self.rebind_task = rebind_task
        # the virtual times of top-ups scheduled for the providers (Engine.topups): a job
        # out of balance waits for the next one rather than stop
        self.topups = tuple(topups)
        self._stop = False
        self.engine: Engine | None = None
        self._wake: asyncio.Event | None = None
        self._futures: dict[int, asyncio.Future[tuple[Response, Classified]]] = {}
        self._started = asyncio.Event()
        self._finished: deque[asyncio.Task[Response]] = deque()
        # item id -> store seq of the items fed and not yet saved (rowid updates)
        self._seqs: dict[str, int] = {}
        # pending items when the preflight counted them (the progress total), and those
        # an earlier run settled (the progress line counts them apart: a resumed job's rate
        # and ETA are this run's)
        self._pending_at_start = 0
        self._settled_before = (0, 0)

    def stop(self) -> None:
        """Ask the run to stop dispatching; in-flight requests finish, results are saved."""
        self._stop = True
        if self._wake is not None:
            self._wake.set()

    async def chat(
        self,
        user: str,
        messages: Iterable[Mapping[str, str]],
        max_tokens: int,
        model: str | None = None,
        tier: str | None = None,
        stream: bool | None = None,
    ) -> tuple[Response, Classified] | UserDecision:
        """Send a chat request through the interactive lane of the running job; returns
        the final response (after retries and failover) and its classification, or the
        per-user refusal. ``stream`` None follows the client's ``stream.enabled``."""
        await self._started.wait()
        engine = self.engine
        assert engine is not None and self._wake is not None
        submitted = engine.submit_interactive(self.clock.now(), user, messages, max_tokens,
                                              model, tier, stream)
        if isinstance(submitted, UserDecision):
            return submitted
        future: asyncio.Future[tuple[Response, Classified]] = (
            asyncio.get_running_loop().create_future())
        self._futures[submitted] = future
        self._wake.set()
        return await future

    async def _served_models(self) -> dict[str, set[str]] | None:
        lister = getattr(self.transport, "list_models", None)
        if lister is None:
            return None
        served: dict[str, set[str]] = {}
        for provider in self.config.providers:
            models = await lister(provider.name)
            if models is not None:
                served[provider.name] = models
        return served

    async def preflight(self) -> Engine:
        """Validate task, settings and every pending item; build the engine. Raises
        InputError (naming the item or setting) before any request is sent."""
        served = await self._served_models()
        engine = Engine(self.task, self.config, random.Random(self.config.seed), served,
                        self.predicates, self.user_limits, self.lanes, self.spend, self.topups)
        if served:
            for p in self.config.providers:
                if p.model is not None and p.model not in served.get(p.name, {p.model}):
                    raise InputError(f"providers.{p.name}.model: model {p.model!r} is not "
                                     f"served by {p.name} (per GET /v1/models)")
            for model in sorted(engine.job_models):
                # a provider with a model of its own takes any item, asking for its model
                if not any((p.model or model) in served.get(p.name, {p.model or model})
                           for p in self.config.providers):
                    setting = "task.model" if model == self.task.model else "routing.model"
                    raise InputError(f"{setting}: model {model!r} is not served by any "
                                     "provider (per GET /v1/models)")
        if not self.store.import_complete():
            raise InputError("items: the import of the job's items did not finish (it was "
                             "interrupted): import them again before running the job (none "
                             "is imported twice)")
        counts = self.store.counts()
        # run() takes its starting count from here: a second scan of every row (about
        # 2,500 instructions per item) would read the same counts, nothing was written since
        self._pending_at_start = counts.pending
        self._settled_before = (counts.done, counts.dead)
        if counts.total == 0 and not self.keep_open:
            raise InputError("items: the job has no items")
        # a store with no answer yet takes a changed task silently: there is nothing to mix
        rebind = self.rebind_task or counts.done == 0
        record = TaskRecord(self.task.name, task_digest(self.task), self.task.model)
        before = self.store.bind_task(record, rebind=rebind)
        if before is not None and not rebind:
            raise InputError(
                f"task: the job store holds answers to another task (changed: "
                f"{'; '.join(before.differences(record))}): resuming would mix two tasks' "
                "answers. Use another job store, or continue with this task on purpose "
                "(Runner(rebind_task=True), ratelab job --task-changed)")
        checker = Engine(self.task, self.config, random.Random(0), served, self.predicates)
        cursor = 0
        while True:
            page = self.store.page(cursor, 5000)
            if not page:
                break
            checker.check_page(page.ids, page.texts)
            cursor = page.last_seq
        return engine

    def _feed(self, engine: Engine, cursor: int) -> int:
        seqs = self._seqs
        while engine.wants_items:
            page = self.store.page(cursor, engine.wants_items)
            if not page:
                engine.end_of_items()
                break
            cursor = page.last_seq
            seqs.update(zip(page.ids, page.seqs, strict=True))
            if self.cache is None and not page.tagged:
                # preflight() checked every stored item; the store keeps ids unique. A page
                # of untagged items goes to the engine as columns, with no Item per row.
                engine.add_page(page.ids, page.texts, checked=True)
                continue
            items = [item for _, item in page]
            if self.cache is not None:
                digest = task_digest(self.task)
                keys = {item.id: cache_key(item.text, self.task, route_model(
                    item, self.task.model, self.config.routing, self.predicates), digest)
                    for item in items}
                hits = self.cache.get_many(keys.values())
                fresh = []
                for item in items:
                    code = hits.get(keys[item.id])
                    if code is not None and code in self.task.labels:
                        engine.complete_from_cache(item, code, self.clock.now())
                    else:
                        fresh.append(item)
                items = fresh
                self._flush(engine)
            engine.add_items(items, checked=True)
        return cursor

    def _flush(self, engine: Engine) -> None:
        # The compact drain: a reply's done items stay one Accepted record, written to the
        # store without an ItemResult each; their events are built only for a hook.
        results, events = engine.drain_compact()
        labels = self.task.labels
        if results:
            seqs = self._seqs
            self.store.save_results(results, seqs, labels)
            pop = seqs.pop
            for result in results:
                if type(result) is Accepted:
                    for item_id in map(_ID, result.states):  # saved: their seqs go
                        pop(item_id, None)
                else:
                    assert isinstance(result, ItemResult)
                    seqs.pop(result.item_id, None)
            if self.cache is not None:
                self.cache.put_many(_expand(results, labels))
        hook, on_low_balance = self.on_event, self.on_low_balance
        if hook is None and on_low_balance is None:
            return
        name = self.task.name
        for event in events:
            if type(event) is Accepted:
                if hook is not None:
                    for item_event in event.events(name):
                        hook(item_event)
                continue
            assert isinstance(event, Event)
            if hook is not None:
                hook(event)
            if event.kind == "balance" and on_low_balance is not None:
                on_low_balance(event.balance_usd or 0.0)

    def _answer_interactive(self, engine: Engine) -> None:
        # Interactive answers are final after their retries; a fatal answer to any call
        # also answers the requests still queued.
        for request_id, outcome in engine.drain_interactive():
            future = self._futures.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(outcome)

    def _task_done(self, task: asyncio.Task[Response]) -> None:
        # A done-callback per call, rather than asyncio.wait over every task in flight at
        # every wake (which costs O(in flight) per wake).
        self._finished.append(task)
        if self._wake is not None:
            self._wake.set()

    def _snapshot(self, engine: Engine, start: float, total: int) -> ProgressSnapshot:
        c = engine.counts
        tpm = next((t.tpm for t in engine._throttles.values() if t.tpm), None)
        now = self.clock.now()
        return ProgressSnapshot(now - start, c.done, c.dead, total,
                                c.tokens_in + c.tokens_out, engine.cost.total_usd, tpm,
                                c.rate_limited, *self._settled_before,
                                paused_s=engine.paused_for(now))

    async def run(self) -> JobResult:
        """Run the job; InputError propagates (exit status 2) before any request."""
        engine = await self.preflight()
        # with no hook nothing reads a request event: the engine makes none
        engine.request_events = self.on_event is not None
        self.engine = engine
        self._wake = asyncio.Event()
        self._started.set()
        total = self._pending_at_start
        start = self.clock.now()
        cursor = 0
        # the call of every task in flight (the task runs the transport's send itself)
        tasks: dict[asyncio.Task[Response], Call] = {}
        loop = asyncio.get_running_loop()
        send, task_done = self.transport.send, self._task_done
        last_progress = -1e18
        interrupted = False
        status = EXIT_OK
        reason = ""
        refill = True
        try:
            while True:
                # A send leaves the engine's buffer as full as it was: feed after wakes only.
                if refill:
                    cursor = self._feed(engine, cursor)
                refill = True
                if self._stop and not interrupted:
                    interrupted = True
                if interrupted:
                    if not tasks:
                        status, reason = EXIT_INTERRUPTED, "interrupted"
                        break
                    action: object = None
                else:
                    action = engine.next_action(self.clock.now())
                if type(action) is Send:
                    call = action.call
                    task = loop.create_task(send(call))
                    task.add_done_callback(task_done)
                    tasks[task] = call
                    refill = False
                    continue
                if isinstance(action, Done):
                    if not (self.keep_open and action.status == EXIT_OK and not self._stop):
                        status, reason = action.status, action.reason
                        # a stop with nothing in flight (the spend cap) answered the chats
                        # still queued: hand them their answer rather than cancel them
                        self._answer_interactive(engine)
                        break
                    action = Wait(None)
                timeout = getattr(action, "seconds", None)
                wall = None if timeout is None else max(0.0, timeout) / self.config.time_scale
                if wall is None and not tasks and not self.keep_open:
                    # Nothing in flight and no deadline: re-check soon rather than hang.
                    wall = 0.05
                if self.on_progress is not None:
                    wall = self.progress_every_s if wall is None else min(
                        wall, self.progress_every_s)
                if not self._finished:
                    self._wake.clear()
                    timer = None if wall is None else loop.call_later(wall, self._wake.set)
                    await self._wake.wait()
                    if timer is not None:
                        timer.cancel()
                finished = self._finished
                if finished:
                    now = self.clock.now()
                    while finished:
                        fut = finished.popleft()
                        engine.on_response(now, tasks.pop(fut), fut.result())
                    self._answer_interactive(engine)
                    # Every batch answered in this wake is committed in one transaction
                    # before anything else is sent: a kill still loses only calls in flight.
                    self._flush(engine)
                now = self.clock.now()
                if self.on_progress is not None and now - last_progress >= (
                        self.progress_every_s * self.config.time_scale):
                    last_progress = now
                    self.on_progress(self._snapshot(engine, start, total))
        finally:
            if tasks:
                # Cancelled or failed mid-run: collect what finished, save it.
                done, _pending = await asyncio.wait(tasks, timeout=None)
                for fut in done:
                    if not fut.cancelled() and fut.exception() is None:
                        engine.on_response(self.clock.now(), tasks[fut], fut.result())
                self._answer_interactive(engine)
            self._flush(engine)
            for future in self._futures.values():
                future.cancel()
        if self.on_progress is not None:
            self.on_progress(self._snapshot(engine, start, total))
        after = self.store.counts()
        c = engine.counts
        return JobResult(
            exit_status=status, total=after.total, done=after.done, dead=after.dead,
            pending=after.pending, cached=c.cached, requests=c.requests,
            rate_limited=c.rate_limited, errors=c.errors, tokens_in=c.tokens_in,
            tokens_out=c.tokens_out, cost_usd=engine.cost.total_usd,
            elapsed_s=self.clock.now() - start, reason=reason,
        )

