"""The provider facade: one simulated provider's decisions, pure and seeded.

Contract with the shell (``simulator/server.py``) and the SimPy planner:

* ``chat``/``embeddings`` never raise on bad input: they return a ``Refusal`` (400, 401,
  402, 404, 429, 5xx, an outage status) or an ``Admission``. Checks run in this order: body,
  key (401), model (404), max_tokens vs the model, context window (400
  ``context_length_exceeded``), cost cap (400 ``cost_cap_exceeded``), balance (402 or the
  provider's money style), outage window, rate limits (429), random 500/503.
* Refusals after the key and model are known (cost cap, money, 429) count one request
  against the RPM window when the profile's ``count_refused`` is on (default for OpenAI
  style). Random 500/503 count against RPM when ``count_5xx`` (default) — never against
  tokens, and nothing is charged. Outage refusals do not count (the provider is down).
* Every Admission must be ended by exactly one ``finish(now, admission, delivered_tokens)``
  (completed, faulted or client gone; a second call is ignored). ``delivered_tokens`` is
  the number of chunks of ``plan.chunks`` sent per choice (chunks are one token each), so
  ``plan.n_chunks`` (``len(plan.chunks)``) means complete; with ``n > 1`` every choice
  carries the same chunks
  and the model multiplies. Finishing a queued admission (plan None) withdraws it.
* ``Admission.plan`` is None while the request waits FIFO for a GPU slot (profiles with
  ``gpu:``); ``finish`` returns the admissions it started, their ``plan`` now set, whose
  ``ttft_s`` counts from the ``now`` passed to that ``finish``.
* Faults (``plan.fault``): ``reset`` close the connection abruptly after ``at_chunk`` chunks
  (0: before any byte); ``hold`` send nothing for ``duration_s``, then close; ``stall``
  pause ``duration_s`` before chunk ``at_chunk``; ``error`` after ``at_chunk`` chunks send,
  when streaming, an SSE chunk with a top-level ``error`` object and finish_reason
  ``error`` (status stays 200), and when not streaming answer 500 with OpenAI's error body.
  Slow first tokens and repetition loops are already inside ``ttft_s`` and ``chunks``.
* Headers are complete: the shell copies them. Durations on the wire are wall-clock
  (virtual / time_scale). Anthropic-style reset times and ``Admission.created`` use
  ``epoch_s`` (unix seconds at virtual time 0; pass ``time.time()`` from a live shell, the
  default is fixed for reproducible runs).
* Billing: the charge for the planned reply is taken at admission (it is in the 200's
  headers); ``finish`` refunds undelivered completion tokens when ``refund_undelivered``.
  A balance may dip below zero by one request's cost; the next request is refused
  uncharged. ``X-MDB-Balance-USD`` is absent for unlimited balances.
* Extensions beyond the first contract (backwards compatible): ``Provider(...,
  epoch_s=...)``; ``Admission.n``, ``.inputs`` and ``.encoding_format``;
  ``responder.embedding_vector(text, dims)`` builds deterministic embedding vectors;
  ``stats.render_prometheus([p.stats() for p in providers])`` renders ``/metrics``;
  ``ResponsePlan.text`` (the whole reply) and ``.n_chunks``, with ``.chunks`` split from
  the text on first use.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque

import numpy as np

from simulator.model import errors, faults, latency, responder, structured
from simulator.model.billing import Account, cost_usd
from simulator.model.config import KeyProfile, LimitSpec, ModelProfile, ProviderProfile
from simulator.model.headers import HeaderRenderer, retry_headers
from simulator.model.limits import LimitState
from simulator.model.plan import Admission, Fault, Refusal, ResponsePlan, Usage
from simulator.model.stats import Counters
from simulator.model.tokens import chat_prompt_tokens
from simulator.model.validate import ChatRequest, EmbeddingRequest, parse_chat, parse_embeddings

__all__ = ["Admission", "Fault", "Provider", "Refusal", "ResponsePlan", "Usage"]

DEFAULT_EPOCH_S = 1_700_000_000.0


class _Tenant:
    """One API key's live state: money, limits per model, counters per model."""

    __slots__ = ("account", "counters", "profile", "states")

    def __init__(self, profile: KeyProfile):
        self.profile = profile
        self.account = Account(profile.balance_usd)
        self.states: dict[str, LimitState] = {}
        self.counters: dict[str, Counters] = {}

    def state(self, model: str) -> LimitState:
        state = self.states.get(model)
        if state is None:
            state = self.states[model] = LimitState(self.profile.limits[model])
        return state

    def counter(self, model: str) -> Counters:
        c = self.counters.get(model)
        if c is None:
            c = self.counters[model] = Counters()
        return c


class _Live:
    """Bookkeeping of one admission until ``finish``; it also holds what the limit state
    counted (the TPM handle and reservation), so an admission builds no ticket of its own."""

    __slots__ = ("admission", "counter", "fault", "finish_reason", "model", "n", "n_chunks",
                 "prompt", "reserved", "slow_s", "started", "state", "tenant", "text",
                 "tokens_handle", "tool")

    def __init__(self, admission: Admission, tenant: _Tenant, model: ModelProfile,
                 state: LimitState, tokens_handle: object, reserved: int, counter: Counters,
                 prompt: int, n: int, text: str, n_chunks: int, finish_reason: str,
                 fault: Fault | None, slow_s: float, tool: str | None):
        self.admission = admission
        self.tenant = tenant
        self.model = model
        self.state = state
        self.tokens_handle = tokens_handle
        self.reserved = reserved
        self.counter = counter
        self.prompt = prompt
        self.n = n
        self.text = text
        self.n_chunks = n_chunks  # chunks of 4 characters, one token each
        self.finish_reason = finish_reason
        self.fault = fault
        self.slow_s = slow_s
        self.tool = tool  # a tool-call reply's function (``text`` holds its arguments)
        self.started = False


class Provider:
    """A simulated provider driven by a shell or a planner with virtual ``now`` (seconds)."""

    def __init__(self, profile: ProviderProfile, *, seed: int, time_scale: float = 1.0,
                 epoch_s: float = DEFAULT_EPOCH_S):
        self.profile = profile
        self.name = profile.name
        self.time_scale = time_scale
        self.epoch_s = epoch_s
        self._seed = seed
        self._models = {m.name: m for m in profile.models}
        self._headers = HeaderRenderer(profile.header_style, time_scale, epoch_s)
        self._render_rate = self._headers.renderer()
        self._ids = itertools.count(1)
        self._live: dict[int, _Live] = {}
        self._queue: deque[int] = deque()
        self._seqs = 0  # GPU sequences decoding
        self._stream_faults = faults.has_stream_faults(profile.faults)
        # read once: the per-request path skips what the profile does not configure
        # (no outage window, no random 5xx: no call, and no RNG draw either way)
        self._outages = bool(profile.faults.outages)
        self._random_5xx = bool(profile.faults.error_500_rate or profile.faults.error_503_rate)
        # no cost cap or outage: the gate is the balance, the limits and the random 5xx
        # alone, checked inline by chat (the full _gate explains whatever the first two
        # refuse)
        self._plain_gate = profile.billing.cost_cap_usd is None and not self._outages
        self._charge_headers = profile.billing.charge_headers
        self._time_scale = time_scale
        self._init_state()

    def _init_state(self) -> None:
        seed = self._seed
        # one RNG per concern, so enabling one feature does not shift another's draws
        self._fault_rng = random.Random(f"{seed}:{self.name}:faults")
        self._reply_rng = random.Random(f"{seed}:{self.name}:responder")
        self._latency_rng = random.Random(f"{seed}:{self.name}:latency")
        self._gaps = latency.GapSource(self.profile.latency, np.random.default_rng(
            random.Random(f"{seed}:{self.name}:gaps").getrandbits(64)))
        self._tenants = {k.key: _Tenant(k) for k in self.profile.keys}

    # ------------------------------------------------------------------ helpers

    def _tenant(self, api_key: str | None) -> _Tenant | dict:
        if not api_key:
            return errors.missing_key()
        tenant = self._tenants.get(api_key)
        if tenant is None:
            if not self.profile.accept_any_key:
                return errors.invalid_key(api_key)
            tenant = self._tenants[api_key] = _Tenant(KeyProfile(
                api_key, self.profile.organization, self.profile.billing.balance_usd,
                self.profile.default_limits))
        return tenant

    def _rate_headers(self, state: LimitState, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        self._headers.rate_headers(state, now, out)
        return out

    def _refuse(self, status: int, body: dict, counter: Counters | None = None,
                headers: dict[str, str] | None = None) -> Refusal:
        if counter is not None:
            counter.count(status)
        return Refusal(status, body, headers if headers is not None else {})

    def _route(self, api_key: str | None, model_name: str, kind: str,
               wrong_kind: str) -> Refusal | tuple[_Tenant, ModelProfile, Counters]:
        """The key (401), the model (404) and that it serves this ``kind`` of request (400,
        ``wrong_kind`` the message): the checks chat and embeddings share, in order."""
        tenant = self._tenant(api_key)
        if not isinstance(tenant, _Tenant):
            return self._refuse(401, tenant)
        model = self._models.get(model_name)
        if model is None:
            return self._refuse(404, errors.model_not_found(model_name))
        counter = tenant.counter(model.name)
        if model.kind != kind:
            return self._refuse(400, errors.invalid_request(
                wrong_kind.format(model=model.name), "model", "model_not_supported"), counter)
        return tenant, model, counter

    def _gate(self, now: float, tenant: _Tenant, model: ModelProfile, state: LimitState,
              counter: Counters, prompt: int, reserved: int, worst_usd: float) -> Refusal | None:
        """Cost cap, balance, outage, rate limits and random 5xx, in that order."""
        billing = self.profile.billing
        count_refused = self.profile.count_refused
        if billing.cost_cap_usd is not None and worst_usd > billing.cost_cap_usd + 1e-12:
            if count_refused:
                state.count_request(now)
            return self._refuse(400, errors.invalid_request(
                f"This request's worst-case cost of {worst_usd:.6f} USD (prompt and max_tokens "
                f"at {model.name} prices) exceeds the per-request cost cap of "
                f"{billing.cost_cap_usd:g} USD. Lower max_tokens or shorten the prompt.",
                "max_tokens", "cost_cap_exceeded"), counter, self._rate_headers(state, now))
        if tenant.account.exhausted():
            if count_refused:
                state.count_request(now)
            money_status, body = errors.money_exhausted(billing.money_style,
                                                        tenant.account.balance_usd or 0.0)
            return self._refuse(money_status, body, counter, self._rate_headers(state, now))
        if self._outages:
            outage = faults.outage_status(self.profile.faults, now)
            if outage is not None:
                return self._refuse(outage, errors.server_error(outage), counter)
        denial = state.check(now, reserved, prompt)
        if denial is not None:
            if denial.too_large:
                # no retry can succeed: no retry-after, and tell the SDK not to retry
                headers = self._rate_headers(state, now)
                headers["x-should-retry"] = "false"
                wait = math.inf
            else:
                if count_refused:
                    state.count_request(now)
                wait = denial.wait_s
                if denial.limit != "concurrency":
                    # after counting the refusal, so a retry at retry-after is admitted
                    wait = state.retry_wait(now, reserved, prompt)
                headers = self._rate_headers(state, now)
                headers.update(retry_headers(wait, self.time_scale))
            body = errors.rate_limited(denial, model.name, tenant.profile.organization,
                                       wait / self.time_scale)
            return self._refuse(429, body, counter, headers)
        status = (faults.random_5xx(self.profile.faults, self._fault_rng)
                  if self._random_5xx else None)
        if status is not None:
            return self._server_error(now, state, counter, status)
        return None

    def _server_error(self, now: float, state: LimitState, counter: Counters,
                      status: int) -> Refusal:
        """The refusal of a random 500/503 (counted on the RPM window when ``count_5xx``)."""
        if self.profile.count_5xx:
            state.count_request(now)
        return self._refuse(status, errors.server_error(status), counter,
                            self._rate_headers(state, now))

    # ------------------------------------------------------------------ chat

    def chat(self, now: float, api_key: str | None, body: object) -> Refusal | Admission:
        """Decide a chat completion request at virtual time ``now``."""
        req = parse_chat(body)
        if not isinstance(req, ChatRequest):
            return self._refuse(400, req)
        # _route's checks inline for a known key on a known chat model (no tuple, no call)
        tenant = self._tenants.get(api_key) if api_key else None
        model = self._models.get(req.model)
        counter = (tenant.counters.get(model.name)
                   if tenant is not None and model is not None else None)
        if counter is None or model is None or model.kind != "chat":
            routed = self._route(api_key, req.model, "chat",
                                 "{model} is an embeddings model; use /v1/embeddings.")
            if isinstance(routed, Refusal):
                return routed
            tenant, model, counter = routed
        assert tenant is not None
        max_tokens = req.max_tokens
        if max_tokens is not None and max_tokens > model.max_output_tokens:
            return self._refuse(400, errors.invalid_request(
                f"max_tokens is too large: {max_tokens}. This model supports at most "
                f"{model.max_output_tokens} completion tokens, whereas you provided "
                f"{max_tokens}.", "max_tokens", "invalid_value"), counter)
        prompt = chat_prompt_tokens(req.texts) + req.definition_tokens
        context = model.context_window
        if prompt > context or (max_tokens is not None and prompt + max_tokens > context):
            if max_tokens is None or prompt > context:
                detail = f"your messages resulted in {prompt} tokens"
            else:
                detail = (f"you requested {prompt + max_tokens} tokens ({prompt} in the "
                          f"messages, {max_tokens} in the completion)")
            return self._refuse(400, errors.invalid_request(
                f"This model's maximum context length is {context} tokens. However, {detail}. "
                "Please reduce the length of the messages or completion.", "messages",
                "context_length_exceeded"), counter)
        state = tenant.states.get(model.name) or tenant.state(model.name)
        # min(cap, room) without the builtin's call (min/max parse their arguments by
        # keyword machinery: a few hundred instructions a call on this path)
        cap = max_tokens or model.max_output_tokens
        room = context - prompt
        limit_max = room if room < cap else cap
        n = req.n
        reserved = state.reservation(prompt, max_tokens, n, req.best_of)
        if not (self._plain_gate and not tenant.account.exhausted()
                and state.check(now, reserved, prompt) is None):
            # the full gate, in its order (the checks above are repeated: they are pure
            # at one instant, and this path refuses or meets a configured fault)
            # the worst case's price is read by a cost cap alone
            worst = (cost_usd(model, prompt, n * limit_max)
                     if self.profile.billing.cost_cap_usd is not None else 0.0)
            refusal = self._gate(now, tenant, model, state, counter, prompt, reserved, worst)
            if refusal is not None:
                return refusal
        elif self._random_5xx:
            # the gate's last check, its one draw, after the same checks passed
            status = faults.random_5xx(self.profile.faults, self._fault_rng)
            if status is not None:
                return self._server_error(now, state, counter, status)
        gpu = self.profile.gpu
        if (gpu is not None and gpu.max_queue is not None and self._seqs >= gpu.max_seqs
                and len(self._queue) >= gpu.max_queue):
            return self._refuse(503, errors.server_error(503), counter,
                                self._rate_headers(state, now))

        # the reply is decided now: its cost is in the 200's headers (the draws in this
        # order: a repetition loop, the reply, a connection fault)
        stream_faults = self._stream_faults
        if stream_faults and faults.draw_repetition(self.profile.faults, self._fault_rng):
            reply = responder.repetition_loop(limit_max)
        elif req.output is None:
            reply = responder.respond(self.profile.responder, self._reply_rng,
                                      req.last_user_text, limit_max)
        else:
            reply = structured.structured_reply(req.output, self.profile.responder,
                                                self._reply_rng, req.last_user_text, limit_max)
        text = reply.text
        n_chunks = (len(text) + 3) // 4  # text_tokens: one token per streamed chunk
        if stream_faults:
            drawn = faults.draw_connection_fault(self.profile.faults, self._fault_rng, n_chunks)
            fault, slow_s = drawn.fault, drawn.slow_first_token_s
        else:
            fault, slow_s = None, 0.0  # faults.NO_FAULTS
        completion = n * n_chunks
        tokens_handle = state.admit(now, reserved, prompt)
        charged = cost_usd(model, prompt, completion)
        account = tenant.account
        account.charge(charged)
        statuses = counter.statuses  # counter.count(200) inline
        statuses[200] = statuses.get(200, 0) + 1
        counter.prompt_tokens += prompt
        counter.completion_tokens += completion
        counter.usd += charged
        headers: dict[str, str] = {}
        self._render_rate(state, now, headers)
        if self._charge_headers:
            account.headers(charged, headers)
        admission = Admission(
            next(self._ids), "chat", model.name, req.stream, req.include_usage, headers, None,
            int(self.epoch_s + now / self._time_scale), n,
        )
        live = _Live(admission, tenant, model, state, tokens_handle, reserved, counter, prompt,
                     n, text, n_chunks, reply.finish_reason, fault, slow_s, reply.tool)
        self._live[admission.id] = live
        if gpu is not None and self._seqs >= gpu.max_seqs:
            self._queue.append(admission.id)
        else:
            self._start(live)
        return admission

    def _start(self, live: _Live) -> None:
        """Give ``live`` its delivery plan; with a GPU profile it takes a decoding slot."""
        live.started = True
        spec = self.profile.latency
        rng = self._latency_rng
        factor = 1.0
        if self.profile.gpu is not None:
            self._seqs += 1
            factor = latency.gpu_itl_factor(self.profile.gpu, self._seqs)
        dist = spec.ttft_s  # latency.ttft inline, a constant TTFT without the sample call
        draw = dist.value if dist.kind == "constant" else latency.sample(dist, rng)
        ttft = draw + spec.prefill_s_per_token * live.prompt + live.slow_s
        gaps = self._gaps.take(live.n_chunks - 1, factor)
        completion = live.n * live.n_chunks
        live.admission.plan = ResponsePlan(
            ttft, gaps, live.text, live.finish_reason,
            Usage(live.prompt, completion, live.prompt + completion), live.fault, live.tool,
        )

    # ------------------------------------------------------------------ embeddings

    def embeddings(self, now: float, api_key: str | None, body: object) -> Refusal | Admission:
        """Decide an embeddings request at virtual time ``now``."""
        req = parse_embeddings(body)
        if not isinstance(req, EmbeddingRequest):
            return self._refuse(400, req)
        routed = self._route(api_key, req.model, "embeddings",
                             "{model} does not support embeddings.")
        if isinstance(routed, Refusal):
            return routed
        tenant, model, counter = routed
        if req.dimensions is not None and req.dimensions > model.dims:
            return self._refuse(400, errors.invalid_request(
                f"This model does not support specifying dimensions above {model.dims}.",
                "dimensions", "invalid_value"), counter)
        if req.max_input_tokens > model.context_window:
            return self._refuse(400, errors.invalid_request(
                f"This model's maximum context length is {model.context_window} tokens, however "
                f"you requested {req.max_input_tokens} tokens in one input. Please reduce your "
                "prompt.", "input", "context_length_exceeded"), counter)
        state = tenant.state(model.name)
        prompt = req.tokens
        charged = cost_usd(model, prompt, 0)
        refusal = self._gate(now, tenant, model, state, counter, prompt, prompt, charged)
        if refusal is not None:
            return refusal
        tokens_handle = state.admit(now, prompt, prompt)
        tenant.account.charge(charged)
        counter.count(200)
        counter.prompt_tokens += prompt
        counter.usd += charged
        headers = self._rate_headers(state, now)
        if self.profile.billing.charge_headers:
            tenant.account.headers(charged, headers)
        plan = ResponsePlan(
            ttft_s=latency.sample(self.profile.latency.embeddings_s, self._latency_rng),
            itl_s=(), text="", finish_reason="stop", usage=Usage(prompt, 0, prompt),
        )
        admission = Admission(
            id=next(self._ids), kind="embeddings", model=model.name, stream=False,
            include_usage=False, headers=headers, plan=plan,
            created=int(self.epoch_s + now / self.time_scale),
            n_inputs=len(req.inputs), dims=req.dimensions or model.dims, inputs=req.inputs,
            encoding_format=req.encoding_format,
        )
        live = _Live(admission, tenant, model, state, tokens_handle, prompt, counter, prompt, 1,
                     "", 0, "stop", None, 0.0, None)
        live.started = True  # embeddings never queue for a GPU slot
        self._live[admission.id] = live
        return admission

    # ------------------------------------------------------------------ finish

    def finish(self, now: float, admission: Admission, delivered_tokens: int) -> list[Admission]:
        """End ``admission`` after ``delivered_tokens`` chunks per choice; returns GPU starts."""
        live = self._live.pop(admission.id, None)
        if live is None:
            return []
        planned = live.n * live.n_chunks
        if not live.started:
            delivered = 0
            self._queue.remove(admission.id)
        else:
            # min(max(0, delivered_tokens), n_chunks) without the builtins' calls
            chunks = delivered_tokens if delivered_tokens > 0 else 0
            if chunks > live.n_chunks:
                chunks = live.n_chunks
            delivered = live.n * chunks
        live.state.settle(now, live.tokens_handle, live.reserved, live.prompt, delivered)
        missing = planned - delivered
        if missing > 0:
            live.counter.completion_tokens -= missing
            if self.profile.billing.refund_undelivered:
                refund = cost_usd(live.model, 0, missing)
                live.tenant.account.refund(refund)
                live.counter.usd -= refund
        started: list[Admission] = []
        if live.started and self.profile.gpu is not None and admission.kind == "chat":
            self._seqs -= 1
            while self._queue and self._seqs < self.profile.gpu.max_seqs:
                queued = self._live[self._queue.popleft()]
                self._start(queued)
                started.append(queued.admission)
        return started

    # ------------------------------------------------------------------ admin

    def models(self) -> dict:
        """Body of ``GET /v1/models``."""
        created = int(self.epoch_s)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": m.owned_by}
            for m in self.profile.models]}

    def stats(self) -> dict:
        """Per key and model: requests by status, tokens, USD; balances; in-flight and queued."""
        keys = {}
        for key, tenant in self._tenants.items():
            keys[key] = {
                "balance_usd": (None if tenant.account.balance_usd is None
                                else round(tenant.account.balance_usd, 10)),
                "spent_usd": round(tenant.account.spent_usd, 10),
                "models": {m: c.as_dict() for m, c in tenant.counters.items()},
            }
        return {"provider": self.name, "in_flight": len(self._live) - len(self._queue),
                "queued": len(self._queue), "keys": keys}

    def topup(self, api_key: str, usd: float) -> float:
        """Add ``usd`` to a key's balance; returns the new balance. KeyError for unknown keys."""
        if not math.isfinite(usd):
            raise ValueError(f"top-up must be a finite amount of USD, got {usd!r}")
        return self._tenants[api_key].account.topup(usd)

    def reset(self, now: float) -> None:
        """Windows, balances and counters back to the configuration; requests in flight stay."""
        inflight = {(k, m): s.inflight for k, t in self._tenants.items()
                    for m, s in t.states.items()}
        self._init_state()
        for (key, model), count in inflight.items():
            tenant = self._tenants.get(key)
            if tenant is not None and count:
                tenant.state(model).inflight = count

    def limit_spec(self, api_key: str, model: str) -> LimitSpec:
        """The limits in force for ``api_key`` on ``model`` (KeyError if either is unknown)."""
        return self._tenants[api_key].profile.limits[model]
