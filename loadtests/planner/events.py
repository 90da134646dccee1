"""Turn the client engine's telemetry into the recorder's neutral events.

After every ``Engine.on_response`` the driver drains the engine and hands this module the
call, the response and the drained events; it returns recorder events for one arm. A
request is a retry when any of its items was sent before (the engine's ``Call.resend``), so
retry amplification counts 429s, errors and skipped items alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from batchclient.events import Event as ClientEvent
from batchclient.policy.state import Accepted
from batchclient.policy.wire import Call, Response
from loadtests.recorder import Event, outcome_for_status

__all__ = ["ArmEvents", "request_outcome"]

ITEM_OUTCOME = {"done": "done", "cached": "cached", "dead": "dead_letter", "skip": "skipped"}


def request_outcome(response: Response) -> str:
    """The recorder outcome of a response: ok, http_429, ..., timeout, cancelled, error."""
    if response.error is None and 200 <= response.status < 300:
        return "ok"  # every answered request of a plan: outcome_for_status's first answer
    if response.error is not None:
        if response.error == "timeout":
            return "timeout"
        if response.error.startswith("watchdog"):
            return "cancelled"
        return "error"
    return outcome_for_status(response.status)


@dataclass(slots=True)
class ArmEvents:
    """The adapter of one arm: client telemetry to recorder events."""

    arm: str

    @staticmethod
    def on_send(call: Call) -> bool:
        """True when ``call`` is a resend: a further attempt, or any of its items was sent
        before (the engine counts each item's sends until the item is finished)."""
        return call.attempt > 0 or call.resend

    def convert(self, now: float, call: Call | None, response: Response | None, retry: bool,
                drained: Iterable[ClientEvent | Accepted], stage: str | None = None
                ) -> list[Event]:
        """Recorder events for one answered call (None: items answered by the cache) and
        the engine events it caused (``Engine.drain_compact``'s, or ``drain``'s)."""
        out: list[Event] = []
        # items of one answer reach their outcomes at the same instant: one event per outcome
        finished: dict[str, int] = {}
        request: ClientEvent | None = None
        for event in drained:
            if isinstance(event, Accepted):
                finished["done"] = finished.get("done", 0) + len(event.states)
            elif event.kind == "item":
                outcome = ITEM_OUTCOME.get(event.outcome)
                if outcome is not None:
                    finished[outcome] = finished.get(outcome, 0) + 1
            elif event.kind == "request" and request is None:
                request = event
        if request is not None and call is not None and response is not None:
            outcome = request_outcome(response)
            ttft_ms = request.ttft_ms
            # positional, in Event's field order (t, kind, arm, outcome, status, latency_s,
            # ttft_s, tokens_in, tokens_out, items, items_ok, cost_usd, retry, truncated,
            # stage): one per request, and keywords cost a name match each
            out.append(Event(
                now, "request", self.arm, outcome, response.status,
                request.response_time_ms / 1000.0,
                None if ttft_ms is None else ttft_ms / 1000.0,
                request.tokens_in, request.tokens_out, len(call.item_ids),
                finished.get("done", 0) if outcome == "ok" else None,
                # as the live runner counts it: a failed request the client will send again
                request.cost_usd, retry, response.finish_reason == "length", stage,
            ))
        arm = self.arm
        for outcome, n in finished.items():
            out.append(Event(now, "item", arm, outcome, 0, 0.0, None, 0, 0, n, None, 0.0,
                             False, False, stage))
        return out
