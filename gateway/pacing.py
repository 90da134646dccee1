"""Pacing of the calls to one upstream: the batching client's ``Throttle``, one per model.

A call waits ``Throttle.delay`` (the lane's ceiling; graduated steps for background work,
none for a waiting user), is reserved at dispatch as the provider counts it
(``tpm_counting``), and is settled to the usage its reply reports, with the reply's
rate-limit headers observed: limits the configuration leaves unset are learned from them,
and other traffic on the key shows in them. A 429 blocks every model of the upstream until
its retry-after. Pure: every decision takes ``now`` (virtual seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchclient.config import ThrottleSettings
from batchclient.policy.classify import Classified
from batchclient.policy.ratelimit_headers import read_rate_headers
from batchclient.policy.responses import reply_parts, window_usage
from batchclient.policy.throttle import Throttle
from batchclient.policy.wire import Response
from gateway.config import Upstream

# As the batching client's default: a refused request (429, 400, 402) still counts against
# the key's RPM, as OpenAI's do.
COUNT_REFUSED = True


@dataclass(frozen=True, slots=True)
class PacedCall:
    """One call to pace: ``key`` names its reservation until it is settled (unique per
    call), ``prompt`` and ``max_tokens`` are tokens, ``expected`` the reply tokens to
    reserve where the provider counts actual usage; ``ceiling`` is the lane's fraction of
    the limits, ``graduated`` whether the 85/95/98 % steps space it (background work)."""

    key: int
    model: str
    prompt: int
    max_tokens: int
    expected: int
    ceiling: float = 1.0
    graduated: bool = True


def throttle_settings(window_margin_s: float) -> ThrottleSettings:
    """The client's throttle settings as the gateway uses them: the whole limit may be
    planned (the old window's ceiling: the lanes lower it for background work), and an
    entry stays ``window_margin_s`` past the provider's 60 s."""
    return ThrottleSettings(ceiling=1.0, expiry_margin_s=window_margin_s)


class UpstreamPacer:
    """The throttles of one upstream's key, one per model (the provider limits and
    reports each model apart), with the upstream's configured limits, counting mode and
    share; ``slots`` is how many workers may call at once (the graduated steps' spacing
    is divided over them); ``time_scale`` turns the headers' wall durations virtual."""

    def __init__(self, upstream: Upstream, settings: ThrottleSettings, slots: int,
                 time_scale: float) -> None:
        self.upstream = upstream
        self.settings = settings
        self.slots = slots
        self.time_scale = time_scale
        self.throttles: dict[str, Throttle] = {}
        self.blocked_until = 0.0
        self.processes = 1

    @property
    def share(self) -> float:
        """This process's part of the key: the upstream's ``share`` (the gateways' part)
        split evenly over the gateway processes that pace the key."""
        return self.upstream.share / self.processes

    def set_processes(self, count: int) -> None:
        """``count`` gateway processes pace this key now (``RedisState.beat``): each keeps
        its own usage within its even part, so together they plan within the limits."""
        self.processes = max(1, count)
        for throttle in self.throttles.values():
            throttle.share = self.share

    def throttle(self, model: str) -> Throttle:
        """The throttle of ``model`` at this upstream, created on first use (blocked as
        the upstream is)."""
        throttle = self.throttles.get(model)
        if throttle is None:
            up = self.upstream
            throttle = self.throttles[model] = Throttle(
                self.settings, up.tpm, up.rpm, up.reserve_max_tokens, share=self.share)
            throttle.block(self.blocked_until)
        return throttle

    def acquire(self, now: float, call: PacedCall) -> float:
        """0.0 when ``call`` may go now (reserved under ``call.key``), else virtual seconds
        to wait before asking again."""
        throttle = self.throttle(call.model)
        tokens = throttle.estimate(call.prompt, call.max_tokens, call.expected)
        wait = throttle.delay(now, tokens, self.slots, ceiling=call.ceiling,
                              graduated=call.graduated, prompt=call.prompt)
        if wait <= 0:
            throttle.reserve(now, call.key, tokens, call.prompt)
        return wait

    def room_wait(self, now: float, call: PacedCall) -> float:
        """Virtual seconds until the window has room for ``call`` at all (its lane's
        ceiling, no graduated spacing), reserving nothing: 0.0 when only the steps'
        spacing holds it back, so a waiting call is told apart from a full window."""
        throttle = self.throttle(call.model)
        tokens = throttle.estimate(call.prompt, call.max_tokens, call.expected)
        return throttle.delay(now, tokens, self.slots, ceiling=call.ceiling,
                              graduated=False, prompt=call.prompt)

    def settle(self, now: float, call: PacedCall, response: Response,
               verdict: Classified) -> None:
        """Replace ``call``'s reservation by what the provider counted for its answer, and
        correct the window with the answer's rate-limit headers."""
        throttle = self.throttle(call.model)
        content, _, usage = reply_parts(response, verdict)
        tokens, requests = window_usage(call.prompt, response, verdict, content, usage,
                                        COUNT_REFUSED)
        prompt = usage.prompt_tokens if usage is not None else call.prompt
        # Observed before the settle: the provider wrote these headers when it admitted
        # the call, with the call counted as admitted (prompt + max_tokens where it
        # reserves), so they are compared with our usage still holding the reservation;
        # after the settle, the floor drops by what the settle gave back. The other way
        # round, each reply would leave its unused max_tokens in the floor until the next.
        throttle.observe(now, read_rate_headers(response.headers, self.time_scale))
        throttle.settle(now, call.key, tokens, requests=requests, prompt=prompt)

    def block(self, until: float) -> None:
        """No call to any model before ``until`` (the provider answered 429)."""
        self.blocked_until = max(self.blocked_until, until)
        for throttle in self.throttles.values():
            throttle.block(until)
