"""Proactive throttle on a rolling window of tokens and requests.

Reserve at dispatch, settle on actual usage, so the window neither over- nor under-counts.
The provider's own rate-limit headers correct the estimate: the provider's usage at the
header's instant plus our own change since then is a floor under our view. Decisions
are "wait d seconds" (0 means go); ``now`` is virtual seconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from batchclient.config import ThrottleSettings
from batchclient.policy.ratelimit_headers import RateHeaders


@dataclass(slots=True)
class _Entry:
    t: float
    tokens: int
    requests: int
    alive: bool = True
    # of ``tokens``, the prompt's (input); the rest is the reply's (output): kept for a
    # provider that limits input and output tokens separately
    prompt: int = 0


@dataclass(slots=True)
class _Snapshot:
    t: float
    provider_used_tokens: int | None
    provider_used_requests: int | None
    our_tokens: int
    our_requests: int
    valid_until: float


class Throttle:
    """Rolling-window throttle of one (provider, model) against its TPM and RPM, and its
    input and output TPM where the provider limits them separately (``input_tpm``,
    ``output_tpm``: prompt tokens, reply tokens). Those two count our own usage only (the
    headers correct the total)."""

    def __init__(
        self,
        settings: ThrottleSettings,
        tpm: int | None,
        rpm: int | None,
        reserve_max_tokens: bool = True,
        share: float = 1.0,
        input_tpm: int | None = None,
        output_tpm: int | None = None,
    ) -> None:
        self.settings = settings
        self.tpm = tpm
        self.rpm = rpm
        self.input_tpm = input_tpm
        self.output_tpm = output_tpm
        self.split = bool(input_tpm or output_tpm)
        self.used_prompt = 0
        # the part of the key's limits our own usage may take (other clients share it)
        self.share = share
        self.reserve_max_tokens = reserve_max_tokens
        self._entries: deque[_Entry] = deque()
        self._by_key: dict[int, _Entry] = {}
        self.used_tokens = 0
        self.used_requests = 0
        self.blocked_until = 0.0
        self._last_dispatch = -1e18
        self._snapshot: _Snapshot | None = None

    # --------------------------------------------------------------- accounting

    def estimate(self, prompt_tokens: int, max_tokens: int, expected_completion: int) -> int:
        """Tokens to reserve for a request, matching the provider's counting mode."""
        return prompt_tokens + (max_tokens if self.reserve_max_tokens else expected_completion)

    def _prune(self, now: float) -> None:
        # An entry leaves our window ``expiry_margin_s`` after the provider's would at the
        # earliest: the provider admitted it a little after we dispatched it.
        cutoff = now - self.settings.window_s - self.settings.expiry_margin_s
        entries = self._entries
        while entries and entries[0].t <= cutoff:
            entry = entries.popleft()
            if entry.alive:
                entry.alive = False
                self.used_tokens -= entry.tokens
                self.used_requests -= entry.requests
                self.used_prompt -= entry.prompt

    def reserve(self, now: float, key: int, tokens: int, prompt: int = 0) -> None:
        """Count a dispatched request (``tokens`` estimated, ``prompt`` of them its
        prompt's) in the window."""
        self._prune(now)
        entry = _Entry(now, tokens, 1, True, prompt)
        self._entries.append(entry)
        self._by_key[key] = entry
        self.used_tokens += tokens
        self.used_requests += 1
        self.used_prompt += prompt
        self._last_dispatch = now

    def settle(self, now: float, key: int, tokens: int, counted: bool = True,
               requests: int | None = None, prompt: int = 0) -> None:
        """Replace a reservation by the actual usage (``prompt`` of ``tokens`` the
        prompt's); ``counted=False`` when the provider did not count the request at all
        (connection failed); ``requests`` overrides the request count (a refusal the
        provider counts against RPM but not TPM)."""
        entry = self._by_key.pop(key, None)
        if entry is None or not entry.alive:
            return
        new_tokens = tokens if counted else 0
        new_requests = requests if requests is not None else (1 if counted else 0)
        new_prompt = prompt if counted and prompt < new_tokens else new_tokens
        self.used_tokens += new_tokens - entry.tokens
        self.used_requests += new_requests - entry.requests
        self.used_prompt += new_prompt - entry.prompt
        entry.tokens, entry.requests, entry.prompt = new_tokens, new_requests, new_prompt
        self._prune(now)

    def block(self, until: float) -> None:
        """Hold every dispatch until ``until`` (a 429's retry-after)."""
        self.blocked_until = max(self.blocked_until, until)

    def observe(self, now: float, rate: RateHeaders) -> None:
        """Correct the estimate with the provider's headers read at ``now``."""
        if not self.settings.use_headers or rate.empty:
            return
        self._prune(now)
        if self.tpm is None and rate.limit_tokens:
            self.tpm = rate.limit_tokens
        if self.rpm is None and rate.limit_requests:
            self.rpm = rate.limit_requests
        if self.input_tpm is None and rate.limit_input_tokens:
            self.input_tpm = rate.limit_input_tokens
            self.split = True
        if self.output_tpm is None and rate.limit_output_tokens:
            self.output_tpm = rate.limit_output_tokens
            self.split = True
        used_t = used_r = None
        if rate.remaining_tokens is not None and (rate.limit_tokens or self.tpm):
            used_t = (rate.limit_tokens or self.tpm or 0) - rate.remaining_tokens
        if rate.remaining_requests is not None and (rate.limit_requests or self.rpm):
            used_r = (rate.limit_requests or self.rpm or 0) - rate.remaining_requests
        # min() of the window and the resets given, as comparisons (every reply comes here)
        horizon = self.settings.window_s
        reset = rate.reset_tokens_s
        if reset is not None and reset < horizon:
            horizon = reset
        reset = rate.reset_requests_s
        if reset is not None and reset < horizon:
            horizon = reset
        self._snapshot = _Snapshot(now, used_t, used_r, self.used_tokens, self.used_requests,
                                   now + horizon)

    # --------------------------------------------------------------- decisions

    def usage(self, now: float) -> tuple[int, int]:
        """(tokens, requests) counted in the window at ``now``, header-corrected."""
        self._prune(now)
        tokens, requests = self.used_tokens, self.used_requests
        snap = self._snapshot
        if snap is not None and now < snap.valid_until:
            # max() of two ints, as comparisons (every dispatch decision comes here)
            if snap.provider_used_tokens is not None:
                floor = snap.provider_used_tokens + tokens - snap.our_tokens
                if floor > tokens:
                    tokens = floor
            if snap.provider_used_requests is not None:
                floor = snap.provider_used_requests + requests - snap.our_requests
                if floor > requests:
                    requests = floor
        return tokens, requests

    def _wait_for_room(self, now: float, excess_tokens: int, excess_requests: int,
                       excess_prompt: int = 0, excess_reply: int = 0) -> float:
        """Seconds until enough of our own entries leave the window to free the excess
        (of tokens, requests, and with split limits of prompt and reply tokens)."""
        freed_t = freed_r = freed_p = freed_o = 0
        window = self.settings.window_s + self.settings.expiry_margin_s
        for entry in self._entries:
            if not entry.alive:
                continue
            freed_t += entry.tokens
            freed_r += entry.requests
            freed_p += entry.prompt
            freed_o += entry.tokens - entry.prompt
            if (freed_t >= excess_tokens and freed_r >= excess_requests
                    and freed_p >= excess_prompt and freed_o >= excess_reply):
                return max(0.0, entry.t + window - now)
        snap = self._snapshot
        if snap is not None and now < snap.valid_until:
            return snap.valid_until - now
        return 0.0

    def delay(self, now: float, tokens: int, slots: int = 1, ceiling: float | None = None,
              graduated: bool = True, prompt: int = 0) -> float:
        """Seconds to wait before dispatching a request of ``tokens`` (0 = go now), of which
        ``prompt`` are its prompt's (for split input and output limits).

        Hard part: never plan beyond ``ceiling`` of TPM/RPM in the window. Graduated part:
        above each step's usage fraction, space dispatches by its delay divided over the
        ``slots`` in flight (the article's per-thread sleep). ``ceiling`` lowers the
        configured one (the background lane leaves headroom to the interactive lane).
        """
        blocked_until = self.blocked_until
        if now < blocked_until:
            return blocked_until - now
        settings = self.settings
        if not settings.enabled:
            return 0.0
        used_t, used_r = self.usage(now)
        # min() and max() as comparisons, each the builtin's pick (the first of equals):
        # a dispatch decision asks this every time it is made
        if ceiling is None or settings.ceiling < ceiling:
            ceiling = settings.ceiling
        tpm, rpm = self.tpm, self.rpm
        excess_t = excess_r = 0
        if tpm:
            excess_t = int(used_t + tokens - tpm * ceiling)
        if rpm:
            excess_r = int(used_r + 1 - rpm * ceiling + 0.999999)
        share = self.share
        if share < 1.0:
            # our own usage against our part of the key; the header-corrected usage above
            # (every client's) against the whole of it
            own_t, own_r = self.used_tokens, self.used_requests
            if tpm:
                own = int(own_t + tokens - tpm * share * ceiling)
                if own > excess_t:
                    excess_t = own
            if rpm:
                own = int(own_r + 1 - rpm * share * ceiling + 0.999999)
                if own > excess_r:
                    excess_r = own
        split_fraction = 0.0
        if self.split:
            # input and output limits: their excesses join the wait below (a few tests on
            # the dispatch decision of every other key, which has none)
            excess_p, excess_o, split_fraction = self._split_excess(tokens, prompt, ceiling,
                                                                    share)
            if excess_p or excess_o:
                wait = self._wait_for_room(now, excess_t if excess_t > 0 else 0,
                                           excess_r if excess_r > 0 else 0, excess_p, excess_o)
                if wait > 0:
                    return wait
        if (excess_t > 0 and used_t > 0) or (excess_r > 0 and used_r > 0):
            wait = self._wait_for_room(now, excess_t if excess_t > 0 else 0,
                                       excess_r if excess_r > 0 else 0)
            if wait > 0:
                return wait
        if not graduated:
            return 0.0
        fraction = 0.0
        if tpm:
            fraction = (used_t + tokens) / tpm
        if rpm:
            by_requests = (used_r + 1) / rpm
            if by_requests > fraction:
                fraction = by_requests
        if share < 1.0:
            if tpm:
                fraction = max(fraction, (self.used_tokens + tokens) / (tpm * share))
            if rpm:
                fraction = max(fraction, (self.used_requests + 1) / (rpm * share))
        if split_fraction > fraction:
            fraction = split_fraction
        step_delay = 0.0
        for threshold, delay in settings.steps:
            if fraction > threshold:
                step_delay = delay
        if step_delay > 0:
            wait = self._last_dispatch + step_delay / (slots if slots > 1 else 1) - now
            return wait if wait > 0.0 else 0.0
        return 0.0

    def _split_excess(self, tokens: int, prompt: int, ceiling: float, share: float
                      ) -> tuple[int, int, float]:
        """For input and output limits: the excess of our own prompt and of our own reply
        tokens over ``ceiling`` of ``share`` of each limit (0 with none of ours in the window
        to wait for), and the larger usage fraction of the two."""
        used_p = self.used_prompt
        used_o = self.used_tokens - used_p
        excess_p = excess_o = 0
        fraction = 0.0
        if self.input_tpm:
            limit = self.input_tpm * share
            if used_p > 0:
                excess_p = max(0, int(used_p + prompt - limit * ceiling))
            fraction = (used_p + prompt) / limit
        if self.output_tpm:
            limit = self.output_tpm * share
            reply = tokens - prompt
            if used_o > 0:
                excess_o = max(0, int(used_o + reply - limit * ceiling))
            fraction = max(fraction, (used_o + reply) / limit)
        return excess_p, excess_o, fraction
