"""The job state machine that both the asyncio runner and the SimPy planner drive.

``next_action(now)`` returns ``Send(call)``, ``Wait(seconds)`` or ``Done(status)``;
``on_response(now, call, response)`` feeds back what came back. Items arrive in pages
(``wants_items``/``add_items``/``end_of_items``); finished items and telemetry leave
through ``drain()``. Pure: time is the ``now`` argument (virtual seconds), randomness the
seeded ``random.Random`` given at construction, no I/O.
"""

from __future__ import annotations

import heapq
import random
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from batchclient.config import ClientConfig, ProviderSettings, Task
from batchclient.cost import CostMeter
from batchclient.events import Event
from batchclient.policy.adaptive import AdaptiveBatchSize
from batchclient.policy.breaker import Breaker
from batchclient.policy.classify import Classified, Verdict, classify
from batchclient.policy.concurrency import Concurrency
from batchclient.policy.job import EXIT_AUTH as EXIT_AUTH
from batchclient.policy.job import EXIT_BALANCE as EXIT_BALANCE
from batchclient.policy.job import EXIT_ERROR as EXIT_ERROR
from batchclient.policy.job import EXIT_INPUT as EXIT_INPUT
from batchclient.policy.job import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from batchclient.policy.job import EXIT_OK as EXIT_OK
from batchclient.policy.job import Action as Action
from batchclient.policy.job import Counts as Counts
from batchclient.policy.job import Done as Done
from batchclient.policy.job import InputError as InputError
from batchclient.policy.job import InteractiveRequest as InteractiveRequest
from batchclient.policy.job import ItemResult as ItemResult
from batchclient.policy.job import Send as Send
from batchclient.policy.job import Wait as Wait
from batchclient.policy.job import cache_key as cache_key
from batchclient.policy.job import hash_text as hash_text
from batchclient.policy.job import normalise as normalise
from batchclient.policy.job import task_digest as task_digest
from batchclient.policy.lanes import LanePolicy
from batchclient.policy.packing import Packer
from batchclient.policy.parsing import parse_reply, read_completion
from batchclient.policy.ratelimit_headers import read_rate_headers
from batchclient.policy.retry import naive_delay, retry_delay
from batchclient.policy.routing import Predicate, choose_provider, route_model
from batchclient.policy.throttle import Throttle
from batchclient.policy.tokens import (
    canonical_id,
    chat_prompt_tokens,
    text_tokens,
)
from batchclient.policy.userlimits import UserDecision, UserLimits
from batchclient.policy.wire import Call, Item, Response, Usage

_ID = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(slots=True)
class _ItemState:
    item: Item
    model: str
    key: str
    sizes: tuple[int, int] = (0, 0)
    attempts: int = 0
    misses: int = 0
    last_error: str | None = None
    state: str = "queued"  # queued | inflight | follower | done | dead


@dataclass(slots=True)
class _Drained:
    results: list[ItemResult] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class Engine:
    """Pure state machine of one job (see the module docstring)."""

    def __init__(
        self,
        task: Task,
        config: ClientConfig,
        rng: random.Random,
        served_models: Mapping[str, Iterable[str]] | None = None,
        predicates: Iterable[tuple[Predicate, str]] = (),
        user_limits: UserLimits | None = None,
        lanes: LanePolicy | None = None,
    ) -> None:
        if not config.providers:
            raise InputError("client config: providers: at least one provider is required")
        if not task.labels:
            raise InputError("task: labels: the taxonomy has no codes")
        self.task = task
        self.config = config
        self.rng = rng
        self.strategy = config.strategy
        self.providers: tuple[ProviderSettings, ...] = config.providers
        self._provider = {p.name: p for p in self.providers}
        self._served = None if served_models is None else {
            k: frozenset(v) for k, v in served_models.items()}
        self._predicates = tuple(predicates)
        self.packer = Packer(task, config.batch.reply_slack_tokens)
        self._digest = task_digest(task)
        self._code_len = max(len(c) for c in task.labels)
        batching = self.strategy == "semantic_batch"
        max_items = config.batch.max_items if batching else 1
        self.adaptive = AdaptiveBatchSize(max_items, config.batch.min_items, max_items * 4) \
            if batching and config.batch.adaptive else None
        self._max_items = max_items
        self.concurrency = Concurrency(config.concurrency)
        self.breakers = {p.name: Breaker(config.breaker) for p in self.providers}
        self._throttles: dict[tuple[str, str], Throttle] = {}
        prices = {p.name: p.prices for p in self.providers}
        self.cost = CostMeter(prices, config.low_balance_usd)
        self.counts = Counts()
        self._items: dict[str, _ItemState] = {}
        self._keys: dict[str, str] = {}  # canonical id -> id, for collision checks
        self._ready: dict[str, deque[str]] = {}
        self._delayed: list[tuple[float, int, str]] = []
        self._followers: dict[str, list[str]] = {}  # dedup key -> waiting duplicate ids
        self._leaders: dict[str, str] = {}  # dedup key -> id being processed
        self._inflight: dict[int, Call] = {}
        self._next_call = 1
        self._seq = 0
        self._exhausted = False
        self._fatal: Done | None = None
        self._out = _Drained()
        self._rate_limited_until: dict[str, float] = {}
        self.user_limits = user_limits
        self.lanes = lanes if lanes is not None else LanePolicy(reserved_slots=0,
                                                                background_ceiling=1.0)
        self._interactive: deque[InteractiveRequest] = deque()
        self._interactive_out: dict[int, tuple[Response, Classified]] = {}
        self._background_inflight = 0

    # ----------------------------------------------------------------- items

    def throttle(self, provider: str, model: str) -> Throttle:
        """The rolling-window throttle of (provider, model), created on first use."""
        key = (provider, model)
        throttle = self._throttles.get(key)
        if throttle is None:
            p = self._provider[provider]
            limits = p.limits_for(model)
            settings = self.config.throttle
            if self.strategy == "naive":
                settings = replace(settings, enabled=False, use_headers=False)
            throttle = Throttle(settings, limits.tpm, limits.rpm, p.reserve_max_tokens)
            self._throttles[key] = throttle
        return throttle

    def _serves(self, provider: str, model: str) -> bool:
        if self._served is None or provider not in self._served:
            return True
        return model in self._served[provider]

    @property
    def buffered(self) -> int:
        """Items held in memory and not finished (queued, delayed, in flight, duplicates)."""
        return self.counts.fed - self.counts.done - self.counts.dead

    @property
    def wants_items(self) -> int:
        """How many more items the engine would like fed now (0: enough buffered or the
        source is exhausted)."""
        if self._exhausted or self._fatal is not None:
            return 0
        low_water = max(self.config.page_size // 2,
                        4 * self._max_items * self.concurrency.limit)
        if self.buffered >= low_water:
            return 0
        return self.config.page_size

    def check_item(self, item: Item) -> tuple[int, int]:
        """Raise InputError naming the item when it can never be processed; returns its
        packing sizes (prompt line and reply characters)."""
        return self._check(item, canonical_id(item.id))

    def _check(self, item: Item, canon: str) -> tuple[int, int]:
        if not _ID.fullmatch(item.id):
            raise InputError(f"item {item.id!r}: id must match [A-Za-z0-9_.-]+")
        if not item.text.strip():
            raise InputError(f"item {item.id!r}: empty text")
        other = self._keys.get(canon)
        if other is not None:
            raise InputError(f"item {item.id!r}: id collides with item {other!r} "
                             "(ids must be unique; all-digit ids compare as numbers)")
        sizes = self.packer.sizes(item)
        alone = self.packer.alone_tokens(sizes)
        budget = self.config.batch.token_budget
        if alone > budget:
            raise InputError(f"item {item.id!r}: needs {alone} tokens alone, over the "
                             f"batch.token_budget of {budget}")
        return sizes

    def add_items(self, items: Iterable[Item]) -> None:
        """Feed a page of items (validated first: raises InputError before any is queued)."""
        page = list(items)
        seen: dict[str, str] = {}
        sizes: list[tuple[int, int]] = []
        canons: list[str] = []
        for item in page:
            canon = canonical_id(item.id)
            sizes.append(self._check(item, canon))
            if canon in seen:
                raise InputError(f"item {item.id!r}: id collides with item {seen[canon]!r}")
            seen[canon] = item.id
            canons.append(canon)
        for item, size, canon in zip(page, sizes, canons, strict=True):
            model = route_model(item, self.task.model, self.config.routing, self._predicates)
            key = cache_key(item.text, self.task, model, self._digest)
            self._keys[canon] = item.id
            state = _ItemState(item, model, key, size)
            self._items[item.id] = state
            self.counts.fed += 1
            if key in self._leaders:
                state.state = "follower"
                self._followers.setdefault(key, []).append(item.id)
                continue
            self._leaders[key] = item.id
            self._ready.setdefault(model, deque()).append(item.id)

    def end_of_items(self) -> None:
        """The source has no more items."""
        self._exhausted = True

    def complete_from_cache(self, item: Item, code: str) -> None:
        """Record an item answered by the result cache (not sent, not paid)."""
        if code not in self.task.labels:
            return
        self.counts.fed += 1
        self._keys[canonical_id(item.id)] = item.id
        self.counts.done += 1
        self.counts.cached += 1
        self._out.results.append(ItemResult(item.id, "done", code, self.task.labels[code]))
        self._out.events.append(Event("item", self.task.name, 0.0, "cached", item_id=item.id))

    # ----------------------------------------------------------------- interactive lane

    def submit_interactive(
        self,
        now: float,
        user: str,
        messages: Iterable[Mapping[str, str]],
        max_tokens: int,
        model: str | None = None,
        tier: str | None = None,
    ) -> int | UserDecision:
        """Queue a chat request in the interactive lane; returns its request id, or the
        per-user refusal (over the user's requests per minute or tokens per day)."""
        msgs = tuple(dict(m) for m in messages)
        if self._fatal is not None:
            return UserDecision(False, 0.0, self._fatal.reason or "job stopped")
        if self.user_limits is not None:
            decision = self.user_limits.admit(now, user, chat_prompt_tokens(msgs) + max_tokens,
                                              tier)
            if not decision.allowed:
                return decision
        request_id = self._next_call
        self._next_call += 1
        self._interactive.append(InteractiveRequest(request_id, user, msgs, max_tokens,
                                                    model or self.task.model, now))
        return request_id

    def interactive_result(self, request_id: int) -> tuple[Response, Classified] | None:
        """The response to an interactive request once it came back (popped)."""
        return self._interactive_out.pop(request_id, None)

    def _next_interactive(self, now: float) -> Action | None:
        if not self._interactive or len(self._inflight) >= self.concurrency.limit:
            return None
        req = self._interactive[0]
        provider = choose_provider(now, self.providers, self.breakers,
                                   lambda p: self._rate_limited_until.get(p, 0.0), req.model,
                                   self._serves)
        if provider is None:
            return Wait(None) if self._inflight else Wait(self.config.breaker.cooldown_s)
        throttle = self.throttle(provider, req.model)
        prompt = chat_prompt_tokens(req.messages)
        reserve = throttle.estimate(prompt, req.max_tokens, req.max_tokens)
        wait = throttle.delay(now, reserve, self.concurrency.limit, graduated=False)
        if wait > 0:
            return Wait(wait)
        self._interactive.popleft()
        call = Call(call_id=req.request_id, provider=provider, model=req.model, item_ids=(),
                    body={"model": req.model, "messages": [dict(m) for m in req.messages],
                          "max_tokens": req.max_tokens, "user": req.user},
                    prompt_tokens=prompt, max_tokens=req.max_tokens, reserved_tokens=reserve,
                    attempt=0, timeout_s=self.config.timeout_s, lane="interactive", sent_at=now)
        throttle.reserve(now, call.call_id, reserve)
        self.breakers[provider].on_dispatch(now)
        self._inflight[call.call_id] = call
        self.counts.requests += 1
        return Send(call)

    # ----------------------------------------------------------------- decisions

    def _release_delayed(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, item_id = heapq.heappop(self._delayed)
            state = self._items[item_id]
            self._ready.setdefault(state.model, deque()).appendleft(item_id)

    def next_action(self, now: float) -> Action:
        """What to do at ``now``: send a call, wait, or finish."""
        if self._fatal is not None:
            return Wait(None) if self._inflight else self._fatal
        self._release_delayed(now)
        interactive = self._next_interactive(now)
        if interactive is not None:
            return interactive
        model = next((m for m, q in self._ready.items() if q), None)
        if model is None:
            if self._inflight:
                return Wait(None)
            if self._delayed:
                return Wait(max(0.0, self._delayed[0][0] - now))
            if self._exhausted:
                return Done(EXIT_OK)
            return Wait(None)
        slots = self.lanes.background_slots(self.concurrency.limit, len(self._interactive))
        if len(self._inflight) >= self.concurrency.limit or self._background_inflight >= slots:
            return Wait(None)
        provider = choose_provider(now, self.providers, self.breakers,
                                   lambda p: self._rate_limited_until.get(p, 0.0), model,
                                   self._serves)
        if provider is None:
            if self._inflight:
                return Wait(None)
            waits = [b.reopens_in(now) for b in self.breakers.values()]
            return Wait(min([w for w in waits if w > 0] or [self.config.breaker.cooldown_s]))
        queue = self._ready[model]
        size = self.adaptive.size if self.adaptive else self._max_items
        states = [self._items[queue[i]] for i in range(min(size, len(queue)))]
        count, prompt_tokens, max_tokens = self.packer.pack_sizes(
            [st.sizes for st in states], size, self.config.batch.token_budget)
        batch = [st.item for st in states[:count]]
        throttle = self.throttle(provider, model)
        expected = max_tokens - self.config.batch.reply_slack_tokens
        reserve = throttle.estimate(prompt_tokens, max_tokens, expected)
        wait = throttle.delay(now, reserve, self.concurrency.limit,
                              ceiling=self.lanes.background_ceiling)
        if wait > 0:
            return Wait(wait)
        self._background_inflight += 1
        for _ in batch:
            item_id = queue.popleft()
            self._items[item_id].state = "inflight"
        call_id = self._next_call
        self._next_call += 1
        attempt = max(self._items[i.id].attempts for i in batch)
        body: dict[str, object] = {
            "model": model,
            "messages": self.packer.messages(batch),
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        stream = self.config.stream.enabled
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        call = Call(
            call_id=call_id, provider=provider, model=model,
            item_ids=tuple(i.id for i in batch), body=body, prompt_tokens=prompt_tokens,
            max_tokens=max_tokens, reserved_tokens=reserve, attempt=attempt,
            timeout_s=self.config.timeout_s, stream=stream, sent_at=now,
        )
        throttle.reserve(now, call_id, reserve)
        self.breakers[provider].on_dispatch(now)
        self._inflight[call_id] = call
        self.counts.requests += 1
        return Send(call)

    # ----------------------------------------------------------------- responses

    def _requeue(self, item_id: str, not_before: float | None, now: float) -> None:
        state = self._items[item_id]
        state.state = "queued"
        if not_before is None or not_before <= now:
            self._ready.setdefault(state.model, deque()).appendleft(item_id)
        else:
            self._seq += 1
            heapq.heappush(self._delayed, (not_before, self._seq, item_id))

    def _finish(self, item_id: str, result: ItemResult, now: float) -> None:
        state = self._items.pop(item_id)
        state.state = result.state
        if result.state == "done":
            self.counts.done += 1
        else:
            self.counts.dead += 1
        self._out.results.append(result)
        self._out.events.append(Event(
            "item", self.task.name, now, "done" if result.state == "done" else "dead",
            provider=result.provider or "", model=result.model or "", item_id=item_id,
            cost_usd=result.cost_usd, error=result.error))
        if self._leaders.get(state.key) == item_id:
            del self._leaders[state.key]
            for follower in self._followers.pop(state.key, []):
                self._items.pop(follower, None)
                if result.state == "done":
                    self.counts.done += 1
                    self.counts.cached += 1
                else:
                    self.counts.dead += 1
                self._out.results.append(replace(result, item_id=follower, cost_usd=0.0))
                self._out.events.append(Event(
                    "item", self.task.name, now, "cached" if result.state == "done" else "dead",
                    item_id=follower, error=result.error))

    def _fail_items(self, call: Call, now: float, reason: str, delay: float | None,
                    count_attempt: bool, dead_now: bool = False) -> None:
        limit = self.config.retry.max_attempts
        for item_id in call.item_ids:
            state = self._items[item_id]
            state.last_error = reason
            if count_attempt:
                state.attempts += 1
            if dead_now or state.attempts >= limit:
                self._finish(item_id, ItemResult(
                    item_id, "dead", model=call.model, provider=call.provider, error=reason,
                    attempts=state.attempts, cache_key=state.key), now)
            else:
                self._requeue(item_id, None if delay is None else now + delay, now)

    def on_response(self, now: float, call: Call, response: Response) -> None:
        """Account for what came back for ``call`` at ``now``."""
        self._inflight.pop(call.call_id, None)
        provider = self._provider[call.provider]
        throttle = self.throttle(call.provider, call.model)
        verdict = classify(response, provider.time_scale)
        content, finish, usage = self._reply(response, verdict)
        counted = verdict.verdict == Verdict.OK or (
            response.error is None and response.status >= 500)
        actual = usage.total if usage is not None else (
            call.prompt_tokens + (text_tokens(content) if content else 0))
        throttle.settle(now, call.call_id, actual, counted=counted and verdict.verdict not in (
            Verdict.FATAL_AUTH, Verdict.FATAL_BALANCE))
        throttle.observe(now, read_rate_headers(response.headers, provider.time_scale))
        charged = 0.0
        if response.status and response.status < 500 and response.status != 402:
            charged = self.cost.charge(call.provider, call.model, self.task.name,
                                       response.headers, usage)
        else:
            self.cost.charge(call.provider, call.model, self.task.name, response.headers, None)
        if usage is not None:
            self.counts.tokens_in += usage.prompt_tokens
            self.counts.tokens_out += usage.completion_tokens
        self._out.events.append(Event(
            "request", f"{self.strategy}:{call.model}", now, verdict.verdict.value,
            provider=call.provider, model=call.model, status=response.status,
            response_time_ms=response.elapsed_s * 1000.0,
            ttft_ms=None if response.ttft_s is None else response.ttft_s * 1000.0,
            tokens_in=usage.prompt_tokens if usage else 0,
            tokens_out=usage.completion_tokens if usage else 0, items=len(call.item_ids),
            cost_usd=charged, error=None if verdict.verdict == Verdict.OK else verdict.reason,
            balance_usd=self.cost.balance_usd))
        if self.cost.low_balance_crossed():
            self._out.events.append(Event("balance", self.task.name, now, "low_balance",
                                          provider=call.provider,
                                          balance_usd=self.cost.balance_usd))
        if call.lane == "interactive":
            if verdict.server_error:
                self.breakers[call.provider].on_failure(now)
            elif response.status:
                self.breakers[call.provider].on_success(now)
            if verdict.rate_limited and verdict.retry_after_s is not None:
                throttle.block(now + verdict.retry_after_s)
            self._interactive_out[call.call_id] = (response, verdict)
            return
        self._background_inflight -= 1
        self._dispatch_verdict(now, call, response, verdict, content, finish, charged)

    def _reply(self, response: Response, verdict: Classified
               ) -> tuple[str | None, str | None, Usage | None]:
        if verdict.verdict != Verdict.OK or (
                response.content is not None and response.usage is not None):
            return response.content, response.finish_reason, response.usage
        content, finish, usage = read_completion(response.body)
        return (response.content if response.content is not None else content,
                response.finish_reason or finish,
                response.usage if response.usage is not None else usage)

    def _dispatch_verdict(self, now: float, call: Call, response: Response,
                          verdict: Classified, content: str | None, finish: str | None,
                          charged: float) -> None:
        breaker = self.breakers[call.provider]
        throttle = self.throttle(call.provider, call.model)
        kind = verdict.verdict
        if kind == Verdict.OK:
            breaker.on_success(now)
            self.concurrency.on_success(now, response.elapsed_s)
            self._accept(now, call, content or "", finish, charged)
            return
        if verdict.server_error:
            breaker.on_failure(now)
            self.counts.errors += 1
        elif response.status:
            breaker.on_success(now)
        if kind in (Verdict.FATAL_BALANCE, Verdict.FATAL_AUTH):
            status = EXIT_BALANCE if kind == Verdict.FATAL_BALANCE else EXIT_AUTH
            if self._fatal is None:
                self._fatal = Done(status, verdict.reason)
            for item_id in call.item_ids:
                self._items[item_id].last_error = verdict.reason
                self._requeue(item_id, None, now)
            return
        if kind == Verdict.NEVER_RETRY:
            self.counts.errors += 1
            if verdict.rate_limited and len(call.item_ids) > 1:
                # "Request too large": the batch, not the items, is at fault; halve it.
                if self.adaptive is not None:
                    self.adaptive.size = max(1, len(call.item_ids) // 2)
                else:
                    self._max_items = max(1, len(call.item_ids) // 2)
                self._fail_items(call, now, verdict.reason, None, count_attempt=False)
                return
            self._fail_items(call, now, verdict.reason, None, count_attempt=True, dead_now=True)
            return
        # RETRY
        if verdict.rate_limited:
            self.counts.rate_limited += 1
            self.concurrency.on_rate_limited(now, response.elapsed_s)
            if self.strategy == "naive":
                n = max(self._items[i].attempts for i in call.item_ids)
                for item_id in call.item_ids:
                    self._items[item_id].attempts += 1
                delay = naive_delay(n, self.rng, self.config.retry)
                self._fail_items(call, now, verdict.reason, delay, count_attempt=False)
                return
            delay = retry_delay(call.attempt, self.rng, self.config.retry, verdict.retry_after_s)
            throttle.block(now + delay)
            self._rate_limited_until[call.provider] = now + delay
            # 429s pace the job, they are not the items' fault: no attempt counted.
            self._fail_items(call, now, verdict.reason, None, count_attempt=False)
            return
        n = max(self._items[i].attempts for i in call.item_ids)
        delay = retry_delay(n, self.rng, self.config.retry, verdict.retry_after_s)
        self._fail_items(call, now, verdict.reason, delay, count_attempt=True)

    def _accept(self, now: float, call: Call, content: str, finish: str | None,
                charged: float) -> None:
        parsed = parse_reply(content, call.item_ids, self.task.labels, finish)
        share = charged / max(1, len(parsed.codes))
        for item_id, code in parsed.codes.items():
            state = self._items[item_id]
            self._finish(item_id, ItemResult(
                item_id, "done", code, self.task.labels[code], call.model, call.provider,
                cost_usd=share, attempts=state.attempts + 1, cache_key=state.key), now)
        if self.adaptive is not None:
            self.adaptive.on_reply(len(call.item_ids), len(parsed.codes), parsed.truncated,
                                   parsed.malformed)
        not_answered = [*parsed.missing, *parsed.rejected]
        damaged = parsed.truncated or parsed.malformed
        for item_id in not_answered:
            state = self._items[item_id]
            reason = parsed.rejected.get(item_id, "left out of the reply")
            repeated = item_id in parsed.repeated
            # A cut or garbled reply is the batch's fault, not the items' it lost; a
            # repeated id is a glitch of the reply: it counts as a failed attempt.
            if repeated:
                state.attempts += 1
            elif item_id in parsed.rejected or not damaged:
                state.misses += 1
            if parsed.truncated and item_id in parsed.missing:
                reason = "reply cut at max_tokens"
            state.last_error = reason
            if (state.misses >= self.config.retry.max_misses
                    or state.attempts >= self.config.retry.max_attempts):
                self._finish(item_id, ItemResult(
                    item_id, "dead", model=call.model, provider=call.provider, error=reason,
                    attempts=state.attempts + state.misses, cache_key=state.key), now)
            else:
                # Skip: back to the queue for the next pass, no error noise.
                self._items[item_id].state = "queued"
                self._ready.setdefault(state.model, deque()).append(item_id)

    # ----------------------------------------------------------------- output

    def drain(self) -> tuple[list[ItemResult], list[Event]]:
        """Finished items and events since the last call (the caller persists them)."""
        out = self._out
        self._out = _Drained()
        return out.results, out.events

    @property
    def inflight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._inflight)

    @property
    def fatal(self) -> Done | None:
        """The fatal stop, once a 402/401 (or equivalent) was seen."""
        return self._fatal


