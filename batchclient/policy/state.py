"""Mutable per-item bookkeeping of the engine and the buffer of what it has to hand out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from batchclient.events import Event
from batchclient.policy.job import ItemResult
from batchclient.policy.wire import Call


@dataclass(slots=True)
class ItemState:
    """One fed item's bookkeeping: its id, text and tag, routing, packing sizes, sends,
    failed attempts and misses. The item's own fields are held here rather than as an
    ``Item`` (one object per item, not two); packing takes it as a ``Packable``. Where the
    item is shows by what holds its state (a ready queue, the retry heap, a call in
    flight, the followers of its key; a finished item's leaves the engine's item map):
    no field repeats it."""

    id: str
    text: str
    model: str
    key: str
    sizes: tuple[int, int] = (0, 0)
    attempts: int = 0
    misses: int = 0
    last_error: str | None = None
    # calls that carried the item and sent it back to a queue (a failure, a skip): as
    # only a reply sends an item back, the calls that carried it before its next send
    sends: int = 0
    tag: str | None = None


@dataclass(slots=True)
class Accepted:
    """The items one reply finished as ``done``, in reply order, kept per call rather than
    as one ``ItemResult`` and one item ``Event`` each: a driver that only counts outcomes
    (the planner) never builds the per-item objects; ``Engine.drain`` expands them.

    ``states`` are the finished items' states (no longer mutated), ``codes`` their codes,
    ``share`` each item's share of the charge (USD), ``at`` the answer's time (virtual s).
    """

    at: float
    call: Call
    share: float
    codes: Mapping[str, str]
    states: list[ItemState]

    def results(self, labels: Mapping[str, str]) -> list[ItemResult]:
        """One ``done`` result per item, as the engine reports a finished item."""
        call, share, codes = self.call, self.share, self.codes
        model, provider = call.model, call.provider
        out = []
        for state in self.states:
            item_id = state.id
            code = codes[item_id]
            out.append(ItemResult(item_id, "done", code, labels[code], model, provider, None,
                                  share, state.attempts + 1, state.key))
        return out

    def events(self, name: str) -> list[Event]:
        """One ``done`` item event per item (``name`` is the task's)."""
        call, share, at = self.call, self.share, self.at
        model, provider, call_id = call.model, call.provider, call.call_id
        # positional, in Event's field order (kind, name, at, outcome, provider, model,
        # status, response_time_ms, ttft_ms, tokens_in, tokens_out, items, cost_usd,
        # item_id, error, balance_usd, call_id), the rest their defaults: one per item,
        # and a keyword costs a name match each
        return [Event("item", name, at, "done", provider, model, 0, 0.0, None, 0, 0, 0,
                      share, state.id, None, None, call_id)
                for state in self.states]


@dataclass(slots=True)
class Drained:
    """Finished items and events not yet handed to the driver; ``Accepted`` entries stand
    for the items of one reply (expanded by ``Engine.drain``, kept by ``drain_compact``)."""

    results: list[ItemResult | Accepted] = field(default_factory=list)
    events: list[Event | Accepted] = field(default_factory=list)
    batches: int = 0  # Accepted entries in ``results`` (each is in ``events`` too)
