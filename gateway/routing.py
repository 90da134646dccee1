"""Which upstream a worker's call goes to: the batching client's failover order, circuit
breakers and ``choose_provider``, kept per gateway process. Pure: every method takes ``now``
(virtual seconds).

Upstreams are tried in configuration order. One whose breaker is open (consecutive 5xx,
timeouts, refused connections) is skipped until a probe may go; a call that failed on one
upstream goes straight to the next one that can take it (``avoid``). An upstream with
``failover_on_429`` also hands work on while it is rate limited: it answered 429, or the
gateway's own window for its key is full.

With several gateway processes (Redis), a breaker that opens or closes here is announced
(``on_change``) and the others apply it (``apply_remote``, through ``gateway.relay``), so an
upstream's outage costs the failed calls of one process, not of every process.

An upstream that refuses for money or its key (402, 429 ``insufficient_quota``, 401/403)
leaves the rotation (``out_of_rotation``), as a batching-client job's provider does: calls
go to the upstreams left. A service has no top-up schedule to wait for, so it probes: once
``probe_s`` has passed, one call may go to it, and any answer but another such refusal brings
it back. Each process finds this out with its own call (a refusal costs nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from batchclient.config import BreakerSettings, ProviderSettings
from batchclient.policy.breaker import Breaker
from batchclient.policy.classify import Classified, Verdict
from batchclient.policy.routing import choose_provider
from gateway.config import Upstream

# Virtual seconds a worker waits when no upstream may take a call and no breaker says
# when one will (a half-open probe is out): short, the probe's answer decides.
PROBE_WAIT_S = 0.5
# refusals for money or the key: the upstream leaves the rotation
FATAL = (Verdict.FATAL_BALANCE, Verdict.FATAL_AUTH)


def provider_settings(up: Upstream, time_scale: float) -> ProviderSettings:
    """The batching client's view of one upstream (transport and routing read it)."""
    return ProviderSettings(up.name, up.base_url, up.api_key, time_scale=time_scale,
                            failover_on_429=up.failover_on_429)


class Router:
    """Breakers and rate-limit marks of every upstream of one gateway process."""

    def __init__(self, upstreams: Sequence[Upstream], breaker: BreakerSettings,
                 time_scale: float = 1.0, probe_s: float = 60.0) -> None:
        self.providers = [provider_settings(u, time_scale) for u in upstreams]
        self.models: Mapping[str, frozenset[str]] = {u.name: frozenset(u.models)
                                                     for u in upstreams}
        self.breakers = {u.name: Breaker(breaker) for u in upstreams}
        self.settings = breaker
        self.probe_s = probe_s
        self._limited_until: dict[str, float] = {}
        # upstreams out of the rotation (402, 401): when one may be probed, and why
        self._out_until: dict[str, float] = {}
        self._out_at: dict[str, float] = {}   # when each went out: older answers say nothing
        self.out_reasons: dict[str, str] = {}
        # told (upstream, opened_at or None when it closed) when a breaker changes state
        self.on_change: Callable[[str, float | None], None] | None = None

    def _serves(self, provider: str, model: str) -> bool:
        return model in self.models[provider]

    def _blocked_until(self, provider: str) -> float:
        return self._limited_until.get(provider, 0.0)

    def choose(self, now: float, model: str, avoid: Sequence[str] = ()) -> str | None:
        """The upstream for a call of ``model``: the first in order that serves it, is in
        the rotation and whose breaker allows, preferring those not in ``avoid`` (they just
        failed this call); None when none may take it now."""
        serves: Callable[[str, str], bool] = self._serves
        out = self._out(now)
        if out:
            def in_rotation(p: str, m: str) -> bool:
                return p not in out and self._serves(p, m)

            serves = in_rotation
        if avoid:
            def fresh(p: str, m: str) -> bool:
                return p not in avoid and serves(p, m)

            found = choose_provider(now, self.providers, self.breakers, self._blocked_until,
                                    model, fresh)
            if found is not None:
                return found
        return choose_provider(now, self.providers, self.breakers, self._blocked_until,
                               model, serves)

    def _out(self, now: float) -> set[str]:
        """The upstreams out of the rotation at ``now`` (their probe not yet due)."""
        return {p for p, until in self._out_until.items() if until > now}

    def out_of_rotation(self, now: float, provider: str, reason: str) -> None:
        """``provider`` refused for money or its key: no call until ``probe_s`` from now."""
        self._out_until[provider] = now + self.probe_s
        self._out_at[provider] = now
        self.out_reasons[provider] = reason

    def in_rotation(self, now: float, model: str) -> bool:
        """Whether an upstream serving ``model`` is in the rotation, or due a probe (its
        breaker or rate limit may still make a call wait)."""
        out = self._out(now)
        return any(p.name not in out and self._serves(p.name, model) for p in self.providers)

    def probe_in(self, now: float, model: str) -> float:
        """Virtual seconds until an upstream serving ``model`` may be probed (0.0 when one
        is in the rotation)."""
        waits = [self._out_until.get(p.name, now) - now for p in self.providers
                 if self._serves(p.name, model)]
        return max(0.0, min(waits, default=0.0))

    def paused_s(self, now: float) -> float | None:
        """Virtual seconds until an upstream may be probed when every one is out of the
        rotation; None while one is in it."""
        if len(self._out_until) < len(self.providers):
            return None
        back = min(self._out_until.values()) - now
        return back if back > 0 else None

    def wait_s(self, now: float) -> float:
        """Virtual seconds until an upstream may be tried again (a breaker reopens)."""
        waits = [w for w in (b.reopens_in(now) for b in self.breakers.values()) if w > 0]
        return min(waits) if waits else PROBE_WAIT_S

    def limited(self, now: float, provider: str, until: float) -> None:
        """``provider`` cannot take calls before ``until`` (a 429, or its window is full)."""
        self._limited_until[provider] = max(self._limited_until.get(provider, 0.0), until)

    def on_dispatch(self, now: float, provider: str) -> None:
        """A call leaves for ``provider`` (in half-open state it is the probe). To an
        upstream out of the rotation it is the probe: other calls wait for its answer, at
        most ``probe_s`` (a probe that never answers lets the next one go then)."""
        self.breakers[provider].on_dispatch(now)
        if provider in self._out_until:
            self._out_until[provider] = now + self.probe_s

    def on_answer(self, now: float, provider: str, verdict: Classified, status: int,
                  sent_at: float | None = None) -> None:
        """Feed the breaker: 5xx and failures without a reply count against it, any other
        reply closes it (as the batching client does). A refusal for money or the key takes
        ``provider`` out of the rotation; an answer to a call sent (``sent_at``) after that
        (the probe) brings it back, one sent before says nothing of the balance now."""
        if verdict.verdict in FATAL:
            self.out_of_rotation(now, provider, verdict.reason)
        elif (status and provider in self._out_until
              and (sent_at if sent_at is not None else now) >= self._out_at[provider]):
            del self._out_until[provider]   # the probe came back: in the rotation again
            del self._out_at[provider]
            self.out_reasons.pop(provider, None)
        breaker = self.breakers[provider]
        before = breaker.opened_at
        if verdict.server_error:
            breaker.on_failure(now)
        elif status:
            breaker.on_success(now)
        if breaker.opened_at != before and self.on_change is not None:
            self.on_change(provider, breaker.opened_at)

    def apply_remote(self, now: float, provider: str, opened_at: float | None) -> None:
        """Another process's breaker for ``provider`` opened at ``opened_at`` (None: it
        closed): take the same state. A later local opening is kept (its cooldown ends
        later); an unknown upstream (another configuration) is ignored."""
        breaker = self.breakers.get(provider)
        if breaker is None:
            return
        if opened_at is None:
            breaker.on_success(now)
        else:
            breaker.opened_elsewhere(opened_at)

    def state(self, now: float) -> dict[str, str]:
        """Each upstream's breaker state (``closed``, ``open``, ``half_open``)."""
        return {name: b.state(now) for name, b in self.breakers.items()}
