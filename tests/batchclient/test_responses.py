"""What the engine does with an answer: request and item events, window accounting."""

from __future__ import annotations

import json
import random

from batchclient.events import Event
from batchclient.policy.engine import Engine, Send
from batchclient.policy.wire import Call, Item, Response
from tests.batchclient.bc_fakes import FakeProvider, config, drive, items, task


def make(n: int, **cfg: object) -> Engine:
    engine = Engine(task(), config(**cfg), random.Random(1))
    engine.add_items(items(n))
    engine.end_of_items()
    return engine


def test_item_events_name_the_request_that_finished_them() -> None:
    engine = make(100)
    events: list[Event] = []
    fake = FakeProvider(seed=4, faults={"drop": 0.1, "truncate": 0.2})
    done, _, _ = drive(engine, fake, events=events)
    assert done.status == 0
    requests = {e.call_id: e for e in events if e.kind == "request"}
    finished: dict[int, int] = {}
    for e in events:
        if e.kind == "item" and e.outcome == "done":
            assert e.call_id is not None and e.call_id in requests
            finished[e.call_id] = finished.get(e.call_id, 0) + 1
    # each request reports exactly the items its own reply resolved
    assert {cid: r.items_ok for cid, r in requests.items() if r.items_ok} == finished
    assert sum(finished.values()) == 100
    cut = [r for r in requests.values() if r.truncated]
    assert cut and all(r.finish_reason == "length" and r.items_ok is not None
                       and r.items_ok < r.items for r in cut)
    # the request event comes before the item events it caused
    first_item = {e.call_id: i for i, e in reversed(list(enumerate(events)))
                  if e.kind == "item"}
    index = {e.call_id: i for i, e in enumerate(events) if e.kind == "request"}
    assert all(index[cid] < at for cid, at in first_item.items())


def test_an_answered_items_event_holds_the_fields_of_a_done_item() -> None:
    # Accepted.events builds its events positionally: each must be the event named field
    # by field, the others left at their defaults
    engine = make(30)
    events: list[Event] = []
    done, _, _ = drive(engine, FakeProvider(seed=2), events=events)
    assert done.status == 0
    requests = {e.call_id: e for e in events if e.kind == "request"}
    items_done = [e for e in events if e.kind == "item"]
    assert len(items_done) == 30
    for e in items_done:
        assert e.call_id is not None
        request = requests[e.call_id]
        assert e == Event("item", engine.task.name, e.at, "done", provider=request.provider,
                          model=request.model, cost_usd=e.cost_usd, item_id=e.item_id,
                          call_id=e.call_id)
        assert e.at == request.at and e.cost_usd == request.cost_usd / request.items_ok


def test_a_call_is_a_resend_when_it_carries_an_item_a_call_carried_before() -> None:
    # items come back to a queue after a 5xx (a failure) and when a reply leaves them out
    # (a skip); a call is a resend exactly when one of its items went out before
    engine = make(60)
    fake = FakeProvider(seed=3, faults={"drop": 0.2})
    calls: list[Call] = []

    def answer(call: Call) -> Response:
        calls.append(call)
        return Response(503, {}, "") if len(calls) % 4 == 1 else fake(call)

    done, _, results = drive(engine, answer)
    assert done.status == 0 and len(results) == 60
    seen: set[str] = set()
    for call in calls:
        assert call.resend == (not seen.isdisjoint(call.item_ids)), call.call_id
        seen.update(call.item_ids)
    assert any(c.resend for c in calls) and not all(c.resend for c in calls)


def test_a_cache_hit_is_stamped_with_the_current_time() -> None:
    engine = Engine(task(), config(), random.Random(1))
    engine.complete_from_cache(Item("1", "product number 1 with words"), "A", now=42.5)
    engine.next_action(50.0)
    engine.complete_from_cache(Item("2", "product number 2 with words"), "B")
    events = engine.drain()[1]
    assert [(e.at, e.outcome, e.call_id) for e in events] == [(42.5, "cached", None),
                                                              (50.0, "cached", None)]


def _refused(count_refused: bool, status: int) -> tuple[int, int]:
    engine = make(20, providers=[{"name": "p1", "base_url": "http://p1/v1", "api_key": "k",
                                  "count_refused": count_refused}])
    action = engine.next_action(0.0)
    assert isinstance(action, Send)
    body = json.dumps({"error": {"type": "requests", "code": "rate_limit_exceeded",
                                 "message": "Rate limit reached"}})
    engine.on_response(0.5, action.call, Response(status, {"retry-after": "1"}, body))
    return engine.throttle("p1", "m1").usage(0.5)


def test_refused_requests_count_against_rpm_as_the_provider_does() -> None:
    # OpenAI counts a refused request against RPM (never its tokens): the default.
    assert config().providers[0].count_refused is True
    assert _refused(True, 429) == (0, 1)
    assert _refused(False, 429) == (0, 0)
    assert _refused(True, 402) == (0, 1)
    # a 5xx is one request and no tokens; no reply at all is nothing
    assert _refused(False, 503) == (0, 1)


def test_an_engine_without_request_events_makes_the_same_item_outcomes() -> None:
    # request_events=False (a runner with no hook): no request event, and the same items
    # done, the same item events, the same calls
    runs = []
    for keep in (True, False):
        engine = make(60)
        engine.request_events = keep
        events: list[Event] = []
        done, _, _ = drive(engine, FakeProvider(seed=4, faults={"drop": 0.1}), events=events)
        assert done.status == 0
        runs.append((engine.counts, [e for e in events if e.kind != "request"],
                     sum(e.kind == "request" for e in events)))
    (counts, items_seen, requests), (counts_off, items_off, requests_off) = runs
    assert counts == counts_off and items_seen == items_off
    assert requests == counts.requests > 0 and requests_off == 0
