"""The interactive lane: chat requests a user waits for, ahead of the background job.

A request is queued by ``submit_interactive`` (refused up front by the per-user limits),
dispatched before any batch, optionally streamed (so its time to first token is measured),
retried with the batch calls' classification and backoff, and failed over to the next
provider at once when one answers 5xx or times out (a primary outage must not reach users
as errors). A fatal answer (402, 401) stops the background job too. ``InteractiveLane`` is
a mixin of ``Engine``; pure like the engine: ``now`` is virtual seconds.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from batchclient.config import ClientConfig, ProviderSettings, Task
from batchclient.cost import SpendBudget
from batchclient.policy.breaker import Breaker
from batchclient.policy.classify import Classified, Verdict
from batchclient.policy.concurrency import Concurrency
from batchclient.policy.job import Action, Counts, Done, InteractiveRequest, Send, Wait
from batchclient.policy.retry import retry_delay
from batchclient.policy.routing import choose_provider
from batchclient.policy.throttle import Throttle
from batchclient.policy.tokens import chat_prompt_tokens
from batchclient.policy.userlimits import UserDecision, UserLimits
from batchclient.policy.wire import Call, Response

Outcome = tuple[Response, Classified]


class InteractiveLane:
    """The engine's interactive half (see the module docstring)."""

    task: Task
    config: ClientConfig
    rng: random.Random
    counts: Counts
    concurrency: Concurrency
    providers: tuple[ProviderSettings, ...]
    breakers: dict[str, Breaker]
    user_limits: UserLimits | None
    _provider: dict[str, ProviderSettings]
    _inflight: dict[int, Call]
    _rate_limited_until: dict[str, float]
    _interactive: deque[InteractiveRequest]
    _interactive_calls: dict[int, InteractiveRequest]
    _interactive_out: dict[int, Outcome]
    _next_call: int
    _fatal: Done | None
    _rotation_back_at: float | None
    _asked: dict[str, str]
    _now: float
    _spend: SpendBudget | None
    _spend_id: int

    if TYPE_CHECKING:
        # Provided by the other halves of Engine.
        def throttle(self, provider: str, model: str) -> Throttle: ...
        def _serves(self, provider: str, model: str) -> bool: ...
        def _stop_fatal(self, verdict: Classified, response: Response,
                        provider: str) -> bool: ...
        def _back_in_rotation(self) -> None: ...
        def _stop_lifts_in(self, now: float) -> float | None: ...
        def _spend_gate(self, provider: str, model: str, prompt_tokens: int,
                        max_tokens: int, left: str = ...) -> float | Action: ...

    def submit_interactive(
        self,
        now: float,
        user: str,
        messages: Iterable[Mapping[str, str]],
        max_tokens: int,
        model: str | None = None,
        tier: str | None = None,
        stream: bool | None = None,
    ) -> int | UserDecision:
        """Queue a chat request in the interactive lane; returns its request id, or the
        per-user refusal (over the user's requests per minute or tokens per day).
        ``stream`` None follows the client's ``stream.enabled``."""
        self._now = now
        msgs = tuple(dict(m) for m in messages)
        back = self._rotation_back_at
        if back is not None and now >= back:
            self._back_in_rotation()
        if self._fatal is not None:
            # out of balance until a top-up: ask again then; else stopped for good
            lifts = self._stop_lifts_in(now)
            return UserDecision(False, 0.0 if lifts is None else lifts,
                                self._fatal.reason or "job stopped", stopped=True)
        if self.user_limits is not None:
            decision = self.user_limits.admit(now, user, chat_prompt_tokens(msgs) + max_tokens,
                                              tier)
            if not decision.allowed:
                return decision
        request_id = self._next_call
        self._next_call += 1
        streamed = self.config.stream.enabled if stream is None else stream
        self._interactive.append(InteractiveRequest(request_id, user, msgs, max_tokens,
                                                    model or self.task.model, now,
                                                    stream=streamed))
        return request_id

    def interactive_result(self, request_id: int) -> Outcome | None:
        """The final answer to an interactive request (after its retries), popped; None
        while it is still queued or in flight."""
        return self._interactive_out.pop(request_id, None)

    def drain_interactive(self) -> list[tuple[int, Outcome]]:
        """Every final interactive answer not yet collected: (request id, outcome)."""
        out = list(self._interactive_out.items())
        self._interactive_out.clear()
        return out

    def _interactive_wait(self, now: float) -> float | None:
        """Virtual seconds until the earliest interactive retry still in its backoff is due
        (None: none is)."""
        due = [r.not_before for r in self._interactive if r.not_before > now]
        return min(due) - now if due else None

    def _choose_for(self, now: float, req: InteractiveRequest) -> str | None:
        def blocked(p: str) -> float:
            return self._rate_limited_until.get(p, 0.0)

        if req.avoid:
            def fresh(p: str, m: str) -> bool:
                return p not in req.avoid and self._serves(p, m)

            provider = choose_provider(now, self.providers, self.breakers, blocked, req.model,
                                       fresh)
            if provider is not None:
                return provider
        return choose_provider(now, self.providers, self.breakers, blocked, req.model,
                               self._serves)

    def _next_interactive(self, now: float) -> Action | None:
        """Send the first due interactive request, wait for its throttle or provider, or
        None when none is due (the background lane may go)."""
        if not self._interactive or len(self._inflight) >= self.concurrency.limit:
            return None
        req = next((r for r in self._interactive if r.not_before <= now), None)
        if req is None:
            return None
        provider = self._choose_for(now, req)
        if provider is None:
            if self._inflight:
                return Wait(None)
            waits = [w for w in (b.reopens_in(now) for b in self.breakers.values()) if w > 0]
            return Wait(min(waits or [self.config.breaker.cooldown_s]))
        model = self._asked.get(provider, req.model)  # a fallback serving another model
        throttle = self.throttle(provider, model)
        prompt = chat_prompt_tokens(req.messages)
        reserve = throttle.estimate(prompt, req.max_tokens, req.max_tokens)
        wait = throttle.delay(now, reserve, self.concurrency.limit, graduated=False,
                              prompt=prompt)
        if wait > 0:
            return Wait(wait)
        held = 0.0
        if self._spend is not None:
            # a chat holds its most possible cost against the spend cap as a batch does
            gate = self._spend_gate(provider, model, prompt, req.max_tokens,
                                    "the chats left are not sent")
            if not isinstance(gate, float):
                return gate
            held = gate
        self._interactive.remove(req)
        # The first attempt keeps the request id as its call id (drivers key on it).
        call_id = req.request_id
        if req.attempt:
            call_id = self._next_call
            self._next_call += 1
        body: dict[str, object] = {"model": model,
                                   "messages": [dict(m) for m in req.messages],
                                   "max_tokens": req.max_tokens, "user": req.user}
        if req.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        call = Call(call_id=call_id, provider=provider, model=model, item_ids=(),
                    body=body, prompt_tokens=prompt, max_tokens=req.max_tokens,
                    reserved_tokens=reserve, attempt=req.attempt,
                    timeout_s=self.config.timeout_s, stream=req.stream, lane="interactive",
                    sent_at=now, request_id=req.request_id)
        throttle.reserve(now, call_id, reserve, prompt)
        if self._spend is not None:
            self._spend.hold((self._spend_id, call_id), held)
        self.breakers[provider].on_dispatch(now)
        self._inflight[call_id] = call
        self._interactive_calls[call_id] = req
        self.counts.requests += 1
        return Send(call)

    def _on_interactive(self, now: float, call: Call, response: Response,
                        verdict: Classified, throttle: Throttle) -> None:
        """Deliver an interactive answer, or queue its retry (backoff, failover)."""
        req = self._interactive_calls.pop(call.call_id, None)
        breaker = self.breakers[call.provider]
        if verdict.server_error:
            breaker.on_failure(now)
            self.counts.errors += 1
        elif response.status:
            breaker.on_success(now)
        kind = verdict.verdict
        failover = False
        if kind in (Verdict.FATAL_BALANCE, Verdict.FATAL_AUTH):
            # Fatal is fatal for the key: the provider leaves the rotation, and with none
            # left the background job stops too; else the chat goes to the next provider
            failover = not self._stop_fatal(verdict, response, call.provider)
        retry = ((kind == Verdict.RETRY or failover) and req is not None
                 and self._fatal is None and req.attempt + 1 < self.config.retry.max_attempts)
        if retry and req is not None:
            self._retry_interactive(now, call, req, verdict, throttle)
            return
        request_id = req.request_id if req is not None else call.call_id
        self._interactive_out[request_id] = (response, verdict)

    def _retry_interactive(self, now: float, call: Call, req: InteractiveRequest,
                           verdict: Classified, throttle: Throttle) -> None:
        avoid = req.avoid
        not_before = now
        if verdict.rate_limited:
            self.counts.rate_limited += 1
            delay = retry_delay(req.attempt, self.rng, self.config.retry, verdict.retry_after_s)
            # The provider's throttle holds this request (and the job) until then; a
            # provider with failover_on_429 hands it to the next one meanwhile.
            throttle.block(now + delay)
            self._rate_limited_until[call.provider] = now + delay
        else:
            # 5xx, timeout, reset: straight to another provider if one can take it,
            # else back off (full jitter) and try them all again.
            avoid = (*avoid, call.provider)
            probe = replace(req, avoid=avoid)
            if self._choose_for(now, probe) in (None, call.provider):
                avoid = ()
                not_before = now + retry_delay(req.attempt, self.rng, self.config.retry,
                                               verdict.retry_after_s)
        self._interactive.appendleft(replace(req, attempt=req.attempt + 1,
                                             not_before=not_before, avoid=avoid))

    def _fail_interactive_queue(self, outcome: Outcome) -> None:
        """After a fatal answer: every queued interactive request gets that answer."""
        while self._interactive:
            req = self._interactive.popleft()
            self._interactive_out[req.request_id] = outcome

