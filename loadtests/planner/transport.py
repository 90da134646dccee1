"""The virtual transport: a client ``Call`` through the simulator's pure ``Provider`` in SimPy.

It does in virtual time what ``batchclient.transport.AiohttpTransport`` and
``simulator.server`` do together in real time: hand the call's body to ``Provider.chat``,
wait for a GPU slot when the model queues it, wait the plan's durations (TTFT, gaps, stalls,
holds), apply the client's deadline and streaming watchdog, tell the model ``finish`` with
the tokens delivered, and build the ``Response`` the real transport would have built.
A call is two SimPy events (its start and its end) and callbacks, not a process: the
planner sends about 100,000 of them for a 2,000,000-item job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Mapping
from typing import Any

import simpy
from simpy.core import URGENT

from batchclient.config import StreamSettings
from batchclient.policy.watchdog import repetition_loop
from batchclient.policy.wire import Call, Response, Usage
from simulator.model.errors import server_error
from simulator.model.plan import Admission, Refusal
from simulator.model.provider import Provider

__all__ = ["VirtualTransport"]


class _Begin(simpy.Event):
    """Runs ``begin(call, on_done)`` at the current virtual time with a process start's
    priority (before the instant's events already queued), as ``env.process`` would."""

    def __init__(self, env: simpy.Environment,
                 begin: Callable[[Call, Callable[[Call, Response], None]], None], call: Call,
                 on_done: Callable[[Call, Response], None]) -> None:
        self.env = env
        self.callbacks = [self._run]
        self._ok = True
        self._value = None
        self._begin, self._call, self._on_done = begin, call, on_done
        env.schedule(self, URGENT)

    def _run(self, _event: simpy.Event) -> None:
        self._begin(self._call, self._on_done)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with lower-case names, as the aiohttp transport reads them. A provider
    sends the same few name sequences (every 200 the same seven): their lower-case forms
    are remembered by sequence, and the values zipped onto them (about a fifth fewer
    instructions than a comprehension, which lowers each name anew)."""
    names = tuple(headers)
    lowered = _LOWERED.get(names)
    if lowered is None:
        if len(_LOWERED) >= _LOWERED_MAX:
            _LOWERED.clear()
        lowered = _LOWERED[names] = tuple([name.lower() for name in names])
    return dict(zip(lowered, headers.values(), strict=True))


# name sequence -> its lower-case names; bounded (cleared when full) like the provider's
# formatting caches
_LOWERED: dict[tuple[str, ...], tuple[str, ...]] = {}
_LOWERED_MAX = 256


class VirtualTransport:
    """Sends calls to simulated providers in a SimPy environment (virtual seconds).

    ``routes`` maps a client provider name to (simulator provider name, API key); several
    client providers (keys) may share one simulator provider.
    """

    def __init__(self, env: simpy.Environment, providers: Mapping[str, Provider],
                 routes: Mapping[str, tuple[str, str]],
                 stream: StreamSettings | None = None) -> None:
        self.env = env
        self.providers = providers
        self.routes = dict(routes)
        self.stream = stream if stream is not None else StreamSettings()
        # (provider name, admission id) -> the event a GPU start triggers with its time
        self._waiters: dict[tuple[str, int], simpy.Event] = {}
        self._streams: dict[str, StreamSettings] = {}

    def add_routes(self, routes: Mapping[str, tuple[str, str]],
                   stream: StreamSettings | None = None) -> None:
        """Route more client provider names (another arm's keys) through this transport,
        with that arm's streaming watchdog settings."""
        self.routes.update(routes)
        if stream is not None:
            for name in routes:
                self._streams[name] = stream

    def list_models(self, provider: str) -> set[str]:
        """The model ids the routed simulator provider serves (``GET /v1/models``)."""
        name, _ = self.routes[provider]
        return {str(m["id"]) for m in self.providers[name].models()["data"]}

    # ------------------------------------------------------------------ the model's side

    def _finish(self, name: str, admission: Admission, delivered: int) -> None:
        """End an admission and start the queued ones it frees (as the shell's _finish)."""
        now = self.env.now
        for other in self.providers[name].finish(now, admission, delivered):
            waiter = self._waiters.pop((name, other.id), None)
            if waiter is None:
                self._finish(name, other, 0)
                continue
            waiter.succeed(now)

    def _finish_at(self, t: float, name: str, admission: Admission,
                   delivered: int) -> Generator[simpy.Event, Any, None]:
        if t > self.env.now:
            yield self.env.timeout(t - self.env.now)
        self._finish(name, admission, delivered)

    def _later(self, t: float, name: str, admission: Admission, delivered: int) -> None:
        if t <= self.env.now:
            self._finish(name, admission, delivered)
        else:
            self.env.process(self._finish_at(t, name, admission, delivered))

    # ------------------------------------------------------------------ the client's side

    def start(self, call: Call, on_done: Callable[[Call, Response], None]) -> None:
        """Send ``call`` as a new SimPy process would (it begins at the current virtual time,
        before the events of that instant already queued) and call ``on_done(call,
        response)`` at the virtual time its Response is complete (never raises). One event
        to begin and one to end, with no process or generator per call."""
        _Begin(self.env, self._begin, call, on_done)

    def _begin(self, call: Call, on_done: Callable[[Call, Response], None]) -> None:
        env = self.env
        t0 = env.now
        name, key = self.routes[call.provider]
        body = call.body
        # the model only reads the body (the shell hands it a fresh one per request)
        result = self.providers[name].chat(t0, key, body if type(body) is dict else dict(body))
        if isinstance(result, Refusal):
            on_done(call, Response(result.status, _lower(result.headers),
                                   json.dumps(result.body)))
            return
        if result.plan is not None:
            self._deliver(call, on_done, name, result, t0, t0)
            return
        # queued for a GPU slot: the slot's start, or the client's deadline first
        waiter = env.event()
        self._waiters[(name, result.id)] = waiter
        either = waiter | env.timeout(call.timeout_s)

        def started(_either: simpy.Event) -> None:
            if not waiter.processed:  # the deadline came first
                self._waiters.pop((name, result.id), None)
                self._finish(name, result, 0)
                on_done(call, Response(0, elapsed_s=env.now - t0, error="timeout"))
                return
            self._deliver(call, on_done, name, result, float(waiter.value or 0.0), t0)

        assert either.callbacks is not None
        either.callbacks.append(started)

    def _deliver(self, call: Call, on_done: Callable[[Call, Response], None], name: str,
                 admission: Admission, start: float, t0: float) -> None:
        """The reply started at ``start``: its Response at its end time."""
        env = self.env
        deadline = t0 + call.timeout_s
        if call.stream:
            watchdog = self._streams.get(call.provider, self.stream)
            response, end, delivered = self._stream(watchdog, admission, start, t0, deadline)
        else:
            response, end, delivered = self._plain(admission, start, t0, deadline)

        def done(_event: simpy.Event | None = None) -> None:
            if response.error == "watchdog_first_token" or response.error == "watchdog_loop":
                # the client hung up; the server notices at its next write
                self._later(self._next_write(admission, start, delivered), name, admission,
                            delivered)
            else:
                self._finish(name, admission, delivered)
            on_done(call, response)

        if end > env.now:
            timeout = env.timeout(end - env.now)
            assert timeout.callbacks is not None
            timeout.callbacks.append(done)
        else:
            done()

    @staticmethod
    def _next_write(admission: Admission, start: float, delivered: int) -> float:
        assert admission.plan is not None
        return admission.plan.chunk_time(start, delivered)

    def _plain(self, admission: Admission, start: float, t0: float,
               deadline: float) -> tuple[Response, float, int]:
        """A non-stream reply: (response, virtual end time, chunks delivered)."""
        plan = admission.plan
        assert plan is not None
        fault = plan.fault
        # one time of the reply is read (where it ends or a fault cuts it), not every chunk's
        if fault is not None and fault.kind == "hold":
            end = start + fault.duration_s
            if end >= deadline:
                return Response(0, elapsed_s=deadline - t0, error="timeout"), deadline, 0
            return Response(0, elapsed_s=end - t0, error="reset"), end, 0
        if fault is not None and fault.kind in ("reset", "error"):
            end = plan.chunk_time(start, fault.at_chunk)
            if end > deadline:
                return Response(0, elapsed_s=deadline - t0, error="timeout"), deadline, 0
            if fault.kind == "reset":
                return Response(0, elapsed_s=end - t0, error="reset"), end, 0
            return Response(500, _lower(admission.headers), json.dumps(server_error(500)),
                            elapsed_s=end - t0), end, 0
        end = plan.chunk_time(start, -1)
        if end > deadline:
            return Response(0, elapsed_s=deadline - t0, error="timeout"), deadline, 0
        usage = Usage(plan.usage.prompt_tokens, plan.usage.completion_tokens)
        # sent whole: the text itself, not its chunks joined again
        return Response(200, _lower(admission.headers), content=plan.text,
                        finish_reason=plan.finish_reason, usage=usage,
                        elapsed_s=end - t0), end, plan.usage.completion_tokens

    @staticmethod
    def _stream(watchdog: StreamSettings, admission: Admission, start: float, t0: float,
                deadline: float) -> tuple[Response, float, int]:
        """An SSE reply read with the client's watchdog: (response, end time, delivered)."""
        plan = admission.plan
        assert plan is not None
        fault = plan.fault
        headers = _lower(admission.headers)
        if fault is not None and fault.kind == "hold":
            end = start + fault.duration_s
            first = t0 + watchdog.first_token_s
            if first < min(end, deadline):
                return Response(200, headers, elapsed_s=first - t0,
                                error="watchdog_first_token"), first, 0
            if end >= deadline:
                return Response(0, elapsed_s=deadline - t0, error="timeout"), deadline, 0
            return Response(0, elapsed_s=end - t0, error="reset"), end, 0
        times = plan.chunk_times(start)
        cut = fault.at_chunk if fault is not None and fault.kind in ("reset", "error") else None
        first_deadline = t0 + watchdog.first_token_s
        if plan.chunks and cut != 0 and times[0] > first_deadline:
            return Response(200, headers, elapsed_s=first_deadline - t0,
                            error="watchdog_first_token"), first_deadline, 0
        ttft = times[0] - t0 if plan.chunks and cut != 0 else None
        parts: list[str] = []
        total = 0
        checked = 0
        n = len(plan.chunks) if cut is None else min(cut, len(plan.chunks))
        for i in range(n):
            if times[i] > deadline:
                return Response(0, elapsed_s=deadline - t0, error="timeout"), deadline, i
            parts.append(plan.chunks[i])
            total += len(plan.chunks[i])
            if total - checked >= 32:
                checked = total
                if repetition_loop("".join(parts)[-2000:], watchdog.loop_min_period,
                                   watchdog.loop_repeats):
                    return Response(200, headers, elapsed_s=times[i] - t0, ttft_s=ttft,
                                    error="watchdog_loop"), times[i], i + 1
        if cut is not None:
            end = times[min(cut, len(times) - 1)]
            if end > deadline:
                return Response(0, elapsed_s=deadline - t0, error="timeout"), deadline, n
            if fault is not None and fault.kind == "reset":
                return Response(0, elapsed_s=end - t0, error="reset"), end, n
            return Response(200, headers, content="".join(parts), finish_reason="error",
                            elapsed_s=end - t0, ttft_s=ttft), end, n
        end = times[-1]
        if end > deadline:
            return Response(0, elapsed_s=deadline - t0, error="timeout"), deadline, 0
        usage = None
        if admission.include_usage:
            usage = Usage(plan.usage.prompt_tokens, plan.usage.completion_tokens)
        return Response(200, headers, content="".join(parts), finish_reason=plan.finish_reason,
                        usage=usage, elapsed_s=end - t0, ttft_s=ttft), end, len(plan.chunks)
