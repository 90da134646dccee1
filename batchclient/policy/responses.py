"""What the engine does with an answer: settle the throttle, meter the cost, emit the
request event, and finish, skip, retry or dead-letter the items of the call.

``ResponseHandling`` is a mixin of ``Engine`` (one concern per file): it only reads and
writes the engine state declared below. Pure like the engine: ``now`` is virtual seconds.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from operator import attrgetter
from typing import TYPE_CHECKING

from batchclient.config import ClientConfig, ProviderSettings, Task
from batchclient.cost import CostMeter, SpendBudget
from batchclient.events import Event
from batchclient.policy.adaptive import AdaptiveBatchSize
from batchclient.policy.breaker import Breaker
from batchclient.policy.classify import Classified, Verdict, classify
from batchclient.policy.concurrency import Concurrency
from batchclient.policy.job import (
    EXIT_AUTH,
    EXIT_BALANCE,
    EXIT_NO_ANSWERS,
    Counts,
    Done,
    ItemResult,
    resume_after_balance,
)
from batchclient.policy.parsing import ParsedReply, parse_reply, read_completion
from batchclient.policy.ratelimit_headers import read_rate_headers
from batchclient.policy.retry import naive_delay, retry_delay
from batchclient.policy.state import Accepted, Drained, ItemState
from batchclient.policy.throttle import Throttle
from batchclient.policy.tokens import text_tokens
from batchclient.policy.wire import Call, Response, Usage

# an item state's cache key, read for a whole reply in one C-level map
_KEY = attrgetter("key")


class ResponseHandling:
    """The engine's response half (see the module docstring)."""

    task: Task
    config: ClientConfig
    rng: random.Random
    strategy: str
    counts: Counts
    cost: CostMeter
    concurrency: Concurrency
    adaptive: AdaptiveBatchSize | None
    breakers: dict[str, Breaker]
    _provider: dict[str, ProviderSettings]
    _items: dict[str, ItemState]
    _ready: dict[str, deque[ItemState]]
    _delayed: list[tuple[float, int, ItemState]]
    _followers: dict[str, list[str]]
    _leaders: dict[str, str]
    _inflight: dict[int, Call]
    _interactive_out: dict[int, tuple[Response, Classified]]
    _rate_limited_until: dict[str, float]
    _background_inflight: int
    _max_items: int
    _seq: int
    _head_moves: int
    _fatal: Done | None
    topups: tuple[float, ...]
    job_models: frozenset[str]
    _out_of_rotation: set[str]
    _rotation_back_at: float | None
    _candidates: dict[str, tuple[ProviderSettings, ...]]
    providers: tuple[ProviderSettings, ...]
    _spend: SpendBudget | None
    _spend_id: int
    _largest_charge: float | None
    _empty_replies: int
    _now: float
    _out: Drained
    # False: an answer makes no request event (a driver that hands events to no one, as
    # ``ratelab job`` without a hook: about 5 us a request for a value nobody reads);
    # item, balance and interactive outcomes are unchanged
    request_events: bool = True

    if TYPE_CHECKING:
        # Provided by the other halves of Engine.
        def throttle(self, provider: str, model: str) -> Throttle: ...
        def _on_interactive(self, now: float, call: Call, response: Response,
                            verdict: Classified, throttle: Throttle) -> None: ...
        def _fail_interactive_queue(self, outcome: tuple[Response, Classified]) -> None: ...
        def _serves(self, provider: str, model: str) -> bool: ...

    def _requeue(self, item_id: str, not_before: float | None, now: float) -> None:
        state = self._items[item_id]
        state.sends += 1  # back from the call that carried it
        if not_before is None or not_before <= now:
            self._ready.setdefault(state.model, deque()).appendleft(state)
            self._head_moves += 1
        else:
            self._seq += 1
            heapq.heappush(self._delayed, (not_before, self._seq, state))

    def _finish(self, item_id: str, result: ItemResult, now: float,
                call_id: int | None = None) -> None:
        state = self._items.pop(item_id)
        if result.state == "done":
            self.counts.done += 1
        else:
            self.counts.dead += 1
        self._out.results.append(result)
        self._out.events.append(Event(
            "item", self.task.name, now, "done" if result.state == "done" else "dead",
            provider=result.provider or "", model=result.model or "", item_id=item_id,
            cost_usd=result.cost_usd, error=result.error, call_id=call_id))
        if self._leaders.get(state.key) == item_id:
            self._release_followers(state, result, now, call_id)

    def _release_followers(self, state: ItemState, result: ItemResult, now: float,
                           call_id: int | None) -> None:
        """The leader of a duplicate group finished: its duplicates finish alike."""
        item_id = result.item_id
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
                    item_id=follower, error=result.error, call_id=call_id))

    def _push_accepted(self, now: float, call: Call, share: float, codes: Mapping[str, str],
                       states: list[ItemState]) -> None:
        accepted = Accepted(now, call, share, codes, states)
        out = self._out
        out.results.append(accepted)
        out.events.append(accepted)
        out.batches += 1

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
                    attempts=state.attempts, cache_key=state.key), now, call.call_id)
            else:
                self._requeue(item_id, None if delay is None else now + delay, now)



    def on_response(self, now: float, call: Call, response: Response) -> None:
        """Account for what came back for ``call`` at ``now``."""
        self._now = now
        self._inflight.pop(call.call_id, None)
        provider = self._provider[call.provider]
        throttle = self.throttle(call.provider, call.model)
        verdict = classify(response, provider.time_scale)
        content, finish, usage = reply_parts(response, verdict)
        tokens, requests = window_usage(call.prompt_tokens, response, verdict, content, usage,
                                        provider.count_refused)
        # the prompt's part, for a provider limiting input and output tokens apart
        prompt = usage.prompt_tokens if usage is not None else call.prompt_tokens
        throttle.settle(now, call.call_id, tokens, requests=requests, prompt=prompt)
        throttle.observe(now, read_rate_headers(response.headers, provider.time_scale))
        charged = 0.0
        if response.status and response.status < 500 and response.status != 402:
            charged = metered = self.cost.charge(call.provider, call.model, self.task.name,
                                                 response.headers, usage)
        else:
            # only a charge header counts for a refusal or a 5xx (usage says nothing of it)
            metered = self.cost.charge(call.provider, call.model, self.task.name,
                                       response.headers, None)
        spend = self._spend
        if spend is not None:
            # the hold is released and what the meter counted is spent, whatever the lane
            spend.settle((self._spend_id, call.call_id), metered)
            # what an answered request costs (a refusal's nothing says nothing of it)
            if response.status == 200 and (self._largest_charge is None
                                           or charged > self._largest_charge):
                self._largest_charge = charged
        if usage is not None:
            self.counts.tokens_in += usage.prompt_tokens
            self.counts.tokens_out += usage.completion_tokens
        # The request event goes before the item events its reply causes.
        events = self._out.events
        at = len(events)
        items_ok: int | None = None
        if call.lane == "interactive":
            self._on_interactive(now, call, response, verdict, throttle)
        else:
            self._background_inflight -= 1
            items_ok = self._dispatch_verdict(now, call, response, verdict, content, finish,
                                              charged)
        if self.request_events:
            events.insert(at, Event(
                "request", f"{self.strategy}:{call.model}", now, verdict.verdict.value,
                provider=call.provider, model=call.model, status=response.status,
                response_time_ms=response.elapsed_s * 1000.0,
                ttft_ms=None if response.ttft_s is None else response.ttft_s * 1000.0,
                tokens_in=usage.prompt_tokens if usage else 0,
                tokens_out=usage.completion_tokens if usage else 0, items=len(call.item_ids),
                cost_usd=charged, error=None if verdict.verdict == Verdict.OK else verdict.reason,
                balance_usd=self.cost.balance_usd, call_id=call.call_id, finish_reason=finish,
                truncated=finish == "length", items_ok=items_ok, lane=call.lane))
        # low_balance_crossed's own first test, without the call: no threshold, no alert
        if self.cost.low_balance_usd is not None and self.cost.low_balance_crossed():
            events.append(Event("balance", self.task.name, now, "low_balance",
                                provider=call.provider, balance_usd=self.cost.balance_usd))

    def _stop_fatal(self, verdict: Classified, response: Response, provider: str) -> bool:
        """A fatal answer (money, authentication) takes ``provider`` out of the rotation
        (until the next scheduled top-up, ``topups``, for money) while the others still
        serve every model of the job (their own accounts: a failover). With none left, the
        job stops dispatch and ends with the exit status once in-flight requests are back,
        or waits for that top-up (``_back_in_rotation`` lifts the stop). Whether the job
        stopped."""
        if self._fatal is None:
            self._out_of_rotation.add(provider)
            self._candidates.clear()  # computed with _serves, which now leaves it out
            if verdict.verdict == Verdict.FATAL_BALANCE and self.topups:
                # back at the next top-up (or, one just due, at the next probe)
                back = resume_after_balance(self.topups, self._now)
                if back is not None and (self._rotation_back_at is None
                                         or back < self._rotation_back_at):
                    self._rotation_back_at = back
            if all(any(self._serves(p.name, m) for p in self.providers)
                   for m in self.job_models):
                return False
            status = EXIT_BALANCE if verdict.verdict == Verdict.FATAL_BALANCE else EXIT_AUTH
            self._fatal = Done(status, verdict.reason)
        self._fail_interactive_queue((response, verdict))
        return True

    def _dispatch_verdict(self, now: float, call: Call, response: Response,
                          verdict: Classified, content: str | None, finish: str | None,
                          charged: float) -> int | None:
        """Finish, skip, retry or dead-letter the call's items; returns how many items
        the reply resolved (None unless it was answered)."""
        breaker = self.breakers[call.provider]
        kind = verdict.verdict
        if kind == Verdict.OK:
            breaker.on_success(now)
            self.concurrency.on_success(now, response.elapsed_s)
            return self._accept(now, call, content or "", finish, charged)
        if verdict.server_error:
            breaker.on_failure(now)
            self.counts.errors += 1
        elif response.status:
            breaker.on_success(now)
        if kind in (Verdict.FATAL_BALANCE, Verdict.FATAL_AUTH):
            self._stop_fatal(verdict, response, call.provider)
            for item_id in call.item_ids:
                self._items[item_id].last_error = verdict.reason
                self._requeue(item_id, None, now)
            return None
        if kind == Verdict.NEVER_RETRY:
            self.counts.errors += 1
            if verdict.too_large and len(call.item_ids) > 1:
                # too large (tokens, context, a per-request cost cap): the batch, not the
                # items, is at fault; halve it
                if self.adaptive is not None:
                    self.adaptive.size = max(1, len(call.item_ids) // 2)
                else:
                    self._max_items = max(1, len(call.item_ids) // 2)
                self._fail_items(call, now, verdict.reason, None, count_attempt=False)
                return None
            self._fail_items(call, now, verdict.reason, None, count_attempt=True, dead_now=True)
            return None
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
                return None
            delay = retry_delay(call.attempt, self.rng, self.config.retry, verdict.retry_after_s)
            self.throttle(call.provider, call.model).block(now + delay)
            self._rate_limited_until[call.provider] = now + delay
            # 429s pace the job, they are not the items' fault: no attempt counted.
            self._fail_items(call, now, verdict.reason, None, count_attempt=False)
            return None
        n = max(self._items[i].attempts for i in call.item_ids)
        delay = retry_delay(n, self.rng, self.config.retry, verdict.retry_after_s)
        self._fail_items(call, now, verdict.reason, delay, count_attempt=True)
        return None

    def _accept(self, now: float, call: Call, content: str, finish: str | None,
                charged: float) -> int:
        parsed = parse_reply(content, call.item_ids, self.task.labels, finish)
        codes = parsed.codes
        share = charged / max(1, len(codes))
        # The hot path of a job (one pass per answered item): the finished items are kept
        # per reply (``Accepted``), not as a result and an event each; ``drain`` expands them.
        items, leaders, followers = self._items, self._leaders, self._followers
        states: list[ItemState] = list(map(items.pop, codes))
        keys = list(map(_KEY, states))
        if list(map(leaders.get, keys)) == list(codes) and followers.keys().isdisjoint(keys):
            # the common reply: every item leads its own key and no duplicate waits on it
            for key in keys:
                del leaders[key]
            if states:
                self._push_accepted(now, call, share, codes, states)
        else:
            self._accept_groups(now, call, share, codes, states)
        self.counts.done += len(codes)
        if self.adaptive is not None:
            self.adaptive.on_reply(len(call.item_ids), len(parsed.codes), parsed.truncated,
                                   parsed.malformed)
        not_answered = [*parsed.missing, *parsed.rejected]
        # A cut or garbled reply that answered some items is the batch's fault, not the
        # items' it lost: they go back without a miss. One that answered none made no
        # progress (a provider whose every reply is prose or cut before the first answer):
        # its items count a miss, or they would be sent, and paid for, forever.
        damaged = parsed.truncated or parsed.malformed
        excused = damaged and bool(parsed.codes)
        if parsed.codes:
            self._empty_replies = 0
        elif damaged or parsed.rejected:
            self._count_empty_reply(parsed)
        for item_id in not_answered:
            state = self._items[item_id]
            reason = parsed.why_unanswered(item_id)
            # a repeated id is a glitch of the reply: it counts as a failed attempt
            if item_id in parsed.repeated:
                state.attempts += 1
            elif item_id in parsed.rejected or not excused:
                state.misses += 1
            state.last_error = reason
            if (state.misses >= self.config.retry.max_misses
                    or state.attempts >= self.config.retry.max_attempts):
                self._finish(item_id, ItemResult(
                    item_id, "dead", model=call.model, provider=call.provider, error=reason,
                    attempts=state.attempts + state.misses, cache_key=state.key), now,
                    call.call_id)
            else:
                # Skip: back to the queue for the next pass, no error noise.
                state.sends += 1  # back from the call that carried it
                self._ready.setdefault(state.model, deque()).append(state)
        return len(parsed.codes)

    def _count_empty_reply(self, parsed: ParsedReply) -> None:
        """One more reply in a row that answered no item: prose, garbled, cut before its
        first answer, or every answer refused (codes outside the taxonomy).
        ``retry.max_empty_replies`` of them stop dispatch (exit 5, items left pending): the
        provider or the prompt is at fault, not the items, and every further request would
        be paid for nothing. A well-formed reply that leaves its items out (a poison
        item's) counts as nothing here."""
        self._empty_replies += 1
        limit = self.config.retry.max_empty_replies
        if limit and self._empty_replies >= limit and self._fatal is None:
            if parsed.truncated:
                how = "cut at max_tokens before their first answer"
            elif parsed.malformed:
                how = "not the JSON array asked for"
            else:
                how = f"every answer refused: {next(iter(parsed.rejected.values()))}"
            self._fatal = Done(EXIT_NO_ANSWERS, (
                f"the last {self._empty_replies} replies answered no item ({how}): check "
                "the provider and the task's prompt; the items are left pending"))

    def _accept_groups(self, now: float, call: Call, share: float, codes: Mapping[str, str],
                       finished: list[ItemState]) -> None:
        """``_accept``'s finished items (already out of the item map, in reply order) when
        some lead a group of duplicates: their duplicates' events follow the leader's."""
        leaders, followers = self._leaders, self._followers
        states: list[ItemState] = []
        for state in finished:
            item_id = state.id
            key = state.key
            if leaders.get(key) == item_id:
                if key in followers:
                    # close the run so far, then the leader's duplicates
                    states.append(state)
                    self._push_accepted(now, call, share, codes, states)
                    states = []
                    code = codes[item_id]
                    self._release_followers(state, ItemResult(
                        item_id, "done", code, self.task.labels[code], call.model,
                        call.provider, None, share, state.attempts + 1, key), now,
                        call.call_id)
                    continue
                del leaders[key]
            states.append(state)
        if states:
            self._push_accepted(now, call, share, codes, states)


def reply_parts(response: Response, verdict: Classified
                ) -> tuple[str | None, str | None, Usage | None]:
    """(content, finish_reason, usage) of an answer: given on the response (a stream), else
    read from its chat-completion body; a failed call's as the response has them."""
    if verdict.verdict != Verdict.OK or (
            response.content is not None and response.usage is not None):
        return response.content, response.finish_reason, response.usage
    content, finish, usage = read_completion(response.body)
    return (response.content if response.content is not None else content,
            response.finish_reason or finish,
            response.usage if response.usage is not None else usage)


def window_usage(prompt_tokens: int, response: Response, verdict: Classified,
                 content: str | None, usage: Usage | None,
                 count_refused: bool) -> tuple[int, int]:
    """(tokens, requests) the provider counted for a call of ``prompt_tokens`` in its
    window, as it does: an answer its usage; a 5xx one request and no tokens; a refusal
    (429, 402, 400) one request when the provider counts refused requests
    (``count_refused``); no reply nothing."""
    kind = verdict.verdict
    if kind == Verdict.OK:
        tokens = usage.total if usage is not None else (
            prompt_tokens + (text_tokens(content) if content else 0))
        return tokens, 1
    status = response.status
    if response.error is not None or not status:
        return 0, 0
    if status >= 500:
        return 0, 1
    # "Request too large" was never admitted nor counted.
    too_large = kind == Verdict.NEVER_RETRY and verdict.rate_limited
    if status in (400, 402, 429) and not too_large and count_refused:
        return 0, 1
    return 0, 0
