"""The engine's interactive lane in virtual time: streaming, retries, failover, fatal stops."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from batchclient.events import Event
from batchclient.policy.classify import Verdict
from batchclient.policy.engine import EXIT_AUTH, EXIT_BALANCE, Done, Engine, Send, Wait
from batchclient.policy.wire import Call, Response
from tests.batchclient.bc_fakes import FakeProvider, config, items, task

TWO = [{"name": "p1", "base_url": "http://p1/v1", "api_key": "k"},
       {"name": "p2", "base_url": "http://p2/v1", "api_key": "k"}]
CHAT = [{"role": "user", "content": "hello there"}]


def chat_ok(call: Call) -> Response:
    body = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
    return Response(200, {}, json.dumps(body), elapsed_s=0.5)


def error(status: int, **headers: str) -> Response:
    body = json.dumps({"error": {"type": "err", "code": f"s{status}", "message": "no"}})
    return Response(status, headers, body, elapsed_s=0.5)


def run(engine: Engine, answer: Callable[[Call], Response], chats: list[float],
        horizon: float = 10_000.0
        ) -> tuple[Done | None, list[Call], dict[int, tuple[float, Response, Verdict]],
                   list[Event]]:
    """Drive ``engine`` in virtual time (every call answers after 0.5 s), submitting one
    chat at each time in ``chats``; returns the end, the calls sent in order, the final
    chat answers by request id (time, response, verdict) and every event."""
    now = 0.0
    pending = sorted(chats)
    inflight: list[tuple[float, Call]] = []
    sent: list[Call] = []
    answers: dict[int, tuple[float, Response, Verdict]] = {}
    events: list[Event] = []
    while now < horizon:
        while pending and pending[0] <= now:
            pending.pop(0)
            engine.submit_interactive(now, "alice", CHAT, 16)
        action = engine.next_action(now)
        if isinstance(action, Send):
            sent.append(action.call)
            inflight.append((now + 0.5, action.call))
            continue
        if isinstance(action, Done) and not pending:
            events.extend(engine.drain()[1])
            return action, sent, answers, events
        seconds = action.seconds if isinstance(action, Wait) else None
        times = [t for t, _ in inflight] + pending[:1]
        if seconds is not None:
            times.append(now + seconds)
        if not times:
            return None, sent, answers, events
        now = max(now, min(times))
        due = [c for t, c in inflight if t <= now]
        inflight = [(t, c) for t, c in inflight if t > now]
        for call in due:
            engine.on_response(now, call, answer(call))
            for request_id, (response, verdict) in engine.drain_interactive():
                answers[request_id] = (now, response, verdict.verdict)
        events.extend(engine.drain()[1])
    raise AssertionError("did not finish")


def engine(n: int = 0, **cfg: object) -> Engine:
    e = Engine(task(), config(**cfg), random.Random(1))
    if n:
        e.add_items(items(n))
    e.end_of_items()
    return e


def test_a_5xx_sends_the_chat_to_the_next_provider_at_once() -> None:
    e = engine(providers=TWO)

    def answer(call: Call) -> Response:
        return error(503) if call.provider == "p1" else chat_ok(call)

    _, sent, answers, events = run(e, answer, [0.0])
    assert [(c.provider, c.attempt, c.request_id) for c in sent] == [("p1", 0, 1), ("p2", 1, 1)]
    assert sent[1].sent_at == 0.5  # no backoff: another provider could take it
    assert answers == {1: (1.0, answers[1][1], Verdict.OK)}
    requests = [(ev.provider, ev.status, ev.outcome, ev.lane) for ev in events]
    assert requests == [("p1", 503, "retry", "interactive"), ("p2", 200, "ok", "interactive")]


def test_a_timeout_on_the_only_provider_backs_off_then_succeeds() -> None:
    e = engine(retry={"base_s": 1.0})
    calls = 0

    def answer(call: Call) -> Response:
        nonlocal calls
        calls += 1
        return Response(0, elapsed_s=0.5, error="timeout") if calls == 1 else chat_ok(call)

    _, sent, answers, _ = run(e, answer, [0.0])
    assert [c.provider for c in sent] == ["p1", "p1"]
    assert sent[1].sent_at > 0.5  # full-jitter backoff, no other provider to go to
    assert answers[1][2] == Verdict.OK


def test_a_429_waits_out_retry_after_and_is_counted() -> None:
    e = engine()
    calls = 0

    def answer(call: Call) -> Response:
        nonlocal calls
        calls += 1
        return error(429, **{"retry-after": "2"}) if calls == 1 else chat_ok(call)

    _, sent, answers, _ = run(e, answer, [0.0])
    assert len(sent) == 2 and sent[1].sent_at >= 0.5 + 2.0
    assert answers[1][2] == Verdict.OK and e.counts.rate_limited == 1


def test_retries_stop_at_max_attempts_and_the_user_gets_the_error() -> None:
    e = engine(retry={"max_attempts": 3, "base_s": 0.1})
    _, sent, answers, _ = run(e, lambda call: error(500), [0.0])
    assert len(sent) == 3
    assert answers[1][1].status == 500 and answers[1][2] == Verdict.RETRY


def test_chats_go_ahead_of_the_background_backlog() -> None:
    e = engine(100, concurrency={"limit": 2}, batch={"max_items": 5})
    _, sent, answers, _ = run(e, FakeProvider(), [0.2, 3.1])
    lanes = [(c.lane, c.sent_at) for c in sent]
    # each chat is sent at the first free slot after it arrives, before any queued batch
    first_after = [next(lane for lane, t in lanes if t >= at) for at in (0.2, 3.1)]
    assert first_after == ["interactive", "interactive"]
    assert len(answers) == 2 and e.counts.done == 100


def test_a_402_on_a_chat_stops_the_background_job() -> None:
    e = engine(100, concurrency={"limit": 2}, batch={"max_items": 5})

    def answer(call: Call) -> Response:
        return error(402) if call.lane == "interactive" else FakeProvider()(call)

    done, sent, answers, _ = run(e, answer, [1.0])
    assert done is not None and done.status == EXIT_BALANCE
    assert [v[2] for v in answers.values()] == [Verdict.FATAL_BALANCE]
    assert e.counts.pending > 0
    chat_at = next(c.sent_at for c in sent if c.lane == "interactive")
    assert all(c.sent_at <= chat_at + 0.5 for c in sent)  # nothing sent after the 402


def test_a_401_on_a_chat_answers_queued_chats_and_refuses_new_ones() -> None:
    e = engine(providers=TWO[:1], concurrency={"limit": 1})
    done, sent, answers, _ = run(e, lambda call: error(401), [0.0, 0.1])
    assert done is not None and done.status == EXIT_AUTH
    assert len(sent) == 1  # the second chat never went out: it got the same 401
    assert sorted(v[1].status for v in answers.values()) == [401, 401]
    refused = e.submit_interactive(5.0, "bob", CHAT, 16)
    assert not isinstance(refused, int) and not refused.allowed


def test_streamed_chat_asks_for_a_stream_with_usage() -> None:
    e = engine()
    request_id = e.submit_interactive(0.0, "alice", CHAT, 16, stream=True)
    action = e.next_action(0.0)
    assert isinstance(action, Send) and action.call.stream
    assert action.call.call_id == request_id
    assert action.call.body["stream_options"] == {"include_usage": True}
    e.on_response(0.5, action.call, Response(200, content="hi", finish_reason="stop",
                                             elapsed_s=0.5, ttft_s=0.2))
    event = e.drain()[1][0]
    assert (event.ttft_ms, event.finish_reason, event.lane) == (200.0, "stop", "interactive")
