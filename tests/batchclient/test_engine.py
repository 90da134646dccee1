"""The engine driven by hand against the in-process fake provider (exact, no network)."""

from __future__ import annotations

import json
import random

import pytest

from batchclient.cost import SpendBudget
from batchclient.policy.engine import (
    EXIT_AUTH,
    EXIT_BALANCE,
    EXIT_NO_ANSWERS,
    EXIT_SPEND_CAP,
    Done,
    Engine,
    InputError,
    Send,
    Wait,
)
from batchclient.policy.job import (
    EXIT_OK,
    TOPUP_GRACE_S,
    TOPUP_PROBE_S,
    resume_after_balance,
)
from batchclient.policy.tokens import text_tokens
from batchclient.policy.userlimits import UserDecision
from batchclient.policy.wire import Call, Item, Response
from tests.batchclient.bc_fakes import FakeProvider, code_of, config, drive, items, task


def make(n: int = 100, topups: tuple[float, ...] = (), **cfg: object) -> Engine:
    engine = Engine(task(), config(**cfg), random.Random(1), topups=topups)
    engine.add_items(items(n))
    engine.end_of_items()
    return engine


def test_semantic_batch_finishes_every_item_with_its_code() -> None:
    engine = make(100)
    done, _, results = drive(engine, FakeProvider())
    assert done.status == 0
    assert len(results) == 100
    for i in range(1, 101):
        r = results[str(i)]
        assert r.state == "done" and r.code == code_of(f"product number {i} with words")
    assert engine.counts.requests == 5  # 20 items a batch


@pytest.mark.parametrize("fault", ["drop", "repeat", "invent", "malformed", "truncate",
                                   "bad_code"])
def test_each_reply_fault_leaves_no_item_misattributed(fault: str) -> None:
    engine = make(300)
    done, _, results = drive(engine, FakeProvider(seed=3, faults={fault: 0.1}))
    assert done.status == 0
    assert len(results) == 300
    wrong = [r for r in results.values()
             if r.state == "done" and r.code != code_of(f"product number {r.item_id} with words")]
    assert wrong == []
    assert all(r.state == "done" for r in results.values())


def test_poison_item_is_dead_lettered_after_max_misses() -> None:
    engine = Engine(task(), config(), random.Random(1))
    engine.add_items([*items(5), Item("99", "POISON pill")])
    engine.end_of_items()
    done, _, results = drive(engine, FakeProvider())
    assert done.status == 0
    assert results["99"].state == "dead" and "left out" in (results["99"].error or "")
    assert engine.counts.done == 5 and engine.counts.dead == 1


def _prose(finish: str):  # type: ignore[no-untyped-def]
    """A provider whose every reply is prose, never the JSON array asked for."""
    def answer(call: Call) -> Response:
        body = json.dumps({"choices": [{"index": 0, "finish_reason": finish, "message": {
            "role": "assistant", "content": "sit amet consectetur adipiscing elit"}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 8}})
        return Response(200, {"x-mdb-charged-usd": "0.0001"}, body, elapsed_s=0.5)
    return answer


@pytest.mark.parametrize(("finish", "error"), [("length", "reply cut at max_tokens"),
                                               ("stop", "reply held no JSON array")])
def test_replies_that_answer_nothing_dead_letter_their_items(finish: str, error: str) -> None:
    # Damaged replies that answer some items excuse the ones they lost; replies that answer
    # none count a miss, else the items would be sent, and paid for, forever.
    engine = make(3)
    done, _, results = drive(engine, _prose(finish), limit=1000)
    assert done.status == 0
    assert {r.state for r in results.values()} == {"dead"} and len(results) == 3
    assert all(error in (r.error or "") for r in results.values())
    assert engine.counts.requests == config().retry.max_misses  # one batch of 3, each pass


@pytest.mark.parametrize(("finish", "how"), [
    ("length", "cut at max_tokens before their first answer"),
    ("stop", "not the JSON array asked for")])
def test_replies_in_a_row_that_answer_nothing_stop_the_job(finish: str, how: str) -> None:
    # 100 items, one batch of 20 in flight at a time: the 10th empty reply in a row stops
    # dispatch (max_empty_replies), every item left pending with two misses, none dead
    engine = make(100, concurrency={"limit": 1})
    done, _, results = drive(engine, _prose(finish), limit=1000)
    assert done.status == EXIT_NO_ANSWERS == 5
    assert done.reason == (f"the last 10 replies answered no item ({how}): check the "
                           "provider and the task's prompt; the items are left pending")
    assert results == {} and engine.counts.requests == 10 and engine.counts.pending == 100
    # 0 never stops: the items are dead-lettered after max_misses passes instead
    engine = make(100, concurrency={"limit": 1}, retry={"max_empty_replies": 0})
    done, _, results = drive(engine, _prose(finish), limit=1000)
    assert done.status == 0 and engine.counts.requests == 25 and len(results) == 100


def test_replies_whose_every_answer_is_refused_stop_the_job_too() -> None:
    # a well-formed array, every code outside the taxonomy (the prompt's codes are wrong)
    engine = make(100, concurrency={"limit": 1})
    done, _, results = drive(engine, FakeProvider(faults={"bad_code": 1.0}), limit=1000)
    assert done.status == EXIT_NO_ANSWERS and engine.counts.requests == 10
    assert done.reason.startswith("the last 10 replies answered no item (every answer "
                                  "refused: code 'Z' outside the taxonomy)")
    assert results == {} and engine.counts.pending == 100


def test_an_answer_between_empty_replies_starts_the_count_again() -> None:
    # every other reply is prose (19 of them), but never ten in a row: no stop; the one
    # batch that met prose on each of its five passes is dead-lettered
    fake = FakeProvider(seed=1)
    prose = _prose("stop")
    engine = make(400, concurrency={"limit": 1})
    done, _, results = drive(engine, lambda call: prose(call) if call.call_id % 2 else
                             fake(call), limit=5000)
    assert done.status == 0 and engine.counts.requests == 39
    states = [r.state for r in results.values()]
    assert (states.count("done"), states.count("dead")) == (380, 20)


def test_cut_replies_that_answer_some_items_excuse_the_rest() -> None:
    # every reply cut, but never before its first answer: no item is dead-lettered
    engine = make(60)
    done, _, results = drive(engine, FakeProvider(seed=4, faults={"truncate": 1.0}))
    assert done.status == 0 and len(results) == 60
    assert all(r.state == "done" for r in results.values())


def test_single_and_naive_send_one_item_per_request() -> None:
    for strategy in ("single", "naive"):
        engine = make(10, strategy=strategy)
        done, _, results = drive(engine, FakeProvider())
        assert done.status == 0 and len(results) == 10
        assert engine.counts.requests == 10


def test_402_stops_dispatch_and_keeps_items_pending() -> None:
    engine = make(100, concurrency={"limit": 1})
    done, _, results = drive(engine, FakeProvider(script={3: 402}))
    assert done.status == EXIT_BALANCE
    assert len(results) == 40 and engine.counts.pending == 60


def test_402_with_a_top_up_scheduled_waits_for_it_and_goes_on() -> None:
    # one request at a time, 0.5 s each: the third (at 1.0 s) is refused; the top-up is
    # due at 30 s, when the job sends again and finishes every item
    engine = make(100, (30.0,), concurrency={"limit": 1})
    fake = FakeProvider(script={3: 402})
    sends: list[float] = []

    def answer(call: Call) -> Response:
        sends.append(call.sent_at)
        return fake(call)

    done, _, results = drive(engine, answer)
    assert done.status == EXIT_OK and len(results) == 100
    assert sends[:4] == [0.0, 0.5, 1.0, 30.0] and engine.counts.requests == 6
    # a chat asked during the wait is refused until the top-up, not for good
    paused = make(20, (30.0,), concurrency={"limit": 1})
    first = paused.next_action(0.0)
    assert isinstance(first, Send)
    paused.on_response(0.5, first.call, FakeProvider(script={1: 402})(first.call))
    assert paused.next_action(0.5) == Wait(29.5)
    refusal = paused.submit_interactive(10.0, "u", [{"role": "user", "content": "hi"}], 10)
    assert isinstance(refusal, UserDecision)
    assert (refusal.allowed, refusal.stopped, refusal.retry_in_s) == (False, True, 20.0)
    assert isinstance(paused.submit_interactive(30.0, "u", [{"role": "user", "content": "hi"}],
                                                10), int)
    # with none scheduled the stop is for good
    stopped = make(20, concurrency={"limit": 1})
    first = stopped.next_action(0.0)
    assert isinstance(first, Send)
    stopped.on_response(0.5, first.call, FakeProvider(script={1: 402})(first.call))
    assert isinstance(stopped.next_action(0.5), Done)
    refusal = stopped.submit_interactive(10.0, "u", [{"role": "user", "content": "hi"}], 10)
    assert isinstance(refusal, UserDecision) and refusal.stopped and refusal.retry_in_s == 0.0


TWO_ACCOUNTS = [{"name": "p1", "base_url": "http://p1/v1", "api_key": "k1"},
                {"name": "p2", "base_url": "http://p2/v1", "api_key": "k2"}]


def test_a_402_from_one_provider_moves_the_work_to_the_next() -> None:
    # two providers on their own accounts: the first runs dry at its third request, the
    # job goes on at the second (failover), and stops only when that one runs dry too
    engine = make(100, concurrency={"limit": 1}, providers=TWO_ACCOUNTS)
    fake = FakeProvider()
    sent: list[str] = []

    def answer(call: Call) -> Response:
        sent.append(call.provider)
        return fake(call) if call.provider == "p2" or len(sent) < 3 else FakeProvider(
            script={1: 402})(call)

    done, _, results = drive(engine, answer)
    assert done.status == EXIT_OK and len(results) == 100
    assert sent == ["p1", "p1", "p1", "p2", "p2", "p2"]  # 40 items on p1, 60 on p2
    # a chat refused by the first account's 402 is answered by the second
    chats = make(0, concurrency={"limit": 1}, providers=TWO_ACCOUNTS)
    request = chats.submit_interactive(0.0, "u", [{"role": "user", "content": "hi"}], 10)
    assert isinstance(request, int)
    first = chats.next_action(0.0)
    assert isinstance(first, Send) and first.call.provider == "p1"
    chats.on_response(0.5, first.call, FakeProvider(script={1: 402})(first.call))
    again = chats.next_action(0.5)
    assert isinstance(again, Send) and again.call.provider == "p2"
    chats.on_response(1.0, again.call, Response(200, {}, '{"choices": []}'))
    assert chats.interactive_result(request)[0].status == 200  # type: ignore[index]
    # a top-up scheduled at 1.6 s brings the first account back into the rotation
    topped = make(100, (1.6,), concurrency={"limit": 1}, providers=TWO_ACCOUNTS)
    sent.clear()

    def dry_once(call: Call) -> Response:  # p1's third request only: topped up after
        sent.append(call.provider)
        return FakeProvider(script={1: 402})(call) if len(sent) == 3 else fake(call)

    done, _, results = drive(topped, dry_once)
    assert done.status == EXIT_OK and len(results) == 100
    # the 402 answered at 1.5 s: p2 takes the next request, p1 the ones from 2.0 s on
    assert sent == ["p1", "p1", "p1", "p2", "p1", "p1"]
    # both dry: the job stops (exit 3), as with one provider
    broke = make(40, concurrency={"limit": 1}, providers=TWO_ACCOUNTS)
    done, _, _ = drive(broke, FakeProvider(script={2: 402, 3: 402}))
    assert done.status == EXIT_BALANCE


def test_resume_after_balance_picks_the_next_top_up_or_probes_a_late_one() -> None:
    assert resume_after_balance((), 10.0) is None
    assert resume_after_balance((300.0, 100.0), 50.0) == 100.0
    # just after a top-up's time (a late one: another process applies it): try again soon
    assert resume_after_balance((100.0,), 101.0) == 101.0 + TOPUP_PROBE_S
    assert resume_after_balance((100.0,), 100.0 + TOPUP_GRACE_S + 1) is None


def test_401_is_fatal_auth() -> None:
    engine = make(20)
    done, _, results = drive(engine, FakeProvider(script={1: 401}))
    assert done.status == EXIT_AUTH and results == {}


def test_5xx_retries_with_backoff_then_dead_letters_at_the_cap() -> None:
    engine = make(20, retry={"max_attempts": 3, "base_s": 0.1})
    done, _now, results = drive(engine, FakeProvider(status_fn=lambda call: 500))
    assert done.status == 0
    assert all(r.state == "dead" and r.attempts == 3 for r in results.values())
    assert engine.counts.requests == 3


def test_never_retry_header_dead_letters_at_once() -> None:
    fake = FakeProvider(script={1: 500})
    fake.headers = {}
    engine = make(20)

    def answer(call):  # type: ignore[no-untyped-def]
        response = fake(call)
        if response.status == 500:
            from dataclasses import replace
            return replace(response, headers={"x-should-retry": "false"})
        return response

    done, _, results = drive(engine, answer)  # type: ignore[arg-type]
    assert done.status == 0
    assert sum(r.state == "dead" for r in results.values()) == 20
    assert engine.counts.requests == 1


def test_429_honours_retry_after_and_does_not_count_attempts() -> None:
    engine = make(40, concurrency={"limit": 1})
    done, now, results = drive(engine, FakeProvider(script={1: 429}))
    assert done.status == 0 and all(r.state == "done" for r in results.values())
    assert engine.counts.rate_limited == 1
    assert now >= 1.0 + 0.5 + 0.5  # waited out retry-after: 1 s


def test_duplicates_inside_a_job_are_sent_once() -> None:
    engine = Engine(task(), config(), random.Random(1))
    engine.add_items([Item("1", "same text"), Item("2", "Same   TEXT"), Item("3", "other")])
    engine.end_of_items()
    fake = FakeProvider()
    _done, _, results = drive(engine, fake)
    assert results["1"].code == results["2"].code == code_of("same text")
    assert engine.counts.cached == 1
    assert sum(fake.answered.values()) == 2


def test_bad_input_is_refused_naming_the_item() -> None:
    engine = Engine(task(), config(), random.Random(1))
    with pytest.raises(InputError, match=r"'007'.*collides"):
        engine.add_items([Item("7", "a"), Item("007", "b")])
    with pytest.raises(InputError, match=r"'big'.*token_budget"):
        engine.add_items([Item("big", "x" * 70000)])
    with pytest.raises(InputError, match="empty text"):
        engine.add_items([Item("e", "  ")])
    with pytest.raises(InputError, match="id must match"):
        engine.add_items([Item("a b", "text")])
    with pytest.raises(InputError, match="taxonomy has no codes"):
        Engine(task(labels={}), config(), random.Random(1))


def test_adaptive_batch_shrinks_on_truncation() -> None:
    engine = make(200, batch={"adaptive": True, "max_items": 20})
    done, _, results = drive(engine, FakeProvider(seed=2, faults={"truncate": 0.5}))
    assert done.status == 0 and all(r.state == "done" for r in results.values())
    assert engine.adaptive is not None and engine.adaptive.size < 20


@pytest.mark.parametrize("ids", [
    [str(n) for n in range(1, 41)],  # all digits: sizes without a test per id
    ["007", "12", "x-1", "a.b", "0", "B_2", "99999999999"],  # leading zeros, quoted ids
])
def test_a_checked_page_is_queued_as_a_checked_item_list_is(ids: list[str]) -> None:
    texts = [f"text of {item_id} with words" for item_id in ids]
    by_items = Engine(task(), config(), random.Random(1))
    by_items.add_items(map(Item, ids, texts), checked=True)
    by_page = Engine(task(), config(), random.Random(1))
    by_page.add_page(ids, texts, checked=True)
    by_page_unchecked = Engine(task(), config(), random.Random(1))
    by_page_unchecked.add_page(ids, texts)
    sizes = [by_items._items[i].sizes for i in ids]
    assert [by_page._items[i].sizes for i in ids] == sizes
    assert [by_page_unchecked._items[i].sizes for i in ids] == sizes
    # a checked page keeps no id for later collision checks (memory grows with the job)
    assert by_page._keys == {} and len(by_page_unchecked._keys) == len(ids)
    for engine in (by_items, by_page):
        engine.end_of_items()
    _, _, expected = drive(by_items, FakeProvider())
    _, _, results = drive(by_page, FakeProvider())
    assert {k: r.code for k, r in results.items()} == {k: r.code for k, r in expected.items()}
    assert len(results) == len(ids)


@pytest.mark.parametrize("ids", [
    [str(n) for n in range(1, 41)],
    ["007", "12", "x-1", "a.b", "0", "B_2", "99999999999"],
])
def test_a_page_of_unique_ids_is_checked_and_queued_as_any_page_but_keeps_no_id(
        ids: list[str]) -> None:
    texts = [f"text of {item_id} with words" for item_id in ids]
    unique = Engine(task(), config(), random.Random(1))
    plain = Engine(task(), config(), random.Random(1))
    half = len(ids) // 2
    for part in (slice(0, half), slice(half, None)):
        unique.add_page(ids[part], texts[part], unique=True)
        plain.add_page(ids[part], texts[part])
    assert unique._keys == {} and len(plain._keys) == len(ids)
    assert [(s.id, s.key, s.sizes) for s in unique._items.values()] == [
        (s.id, s.key, s.sizes) for s in plain._items.values()]
    assert {m: [st.id for st in q] for m, q in unique._ready.items()} == {
        m: [st.id for st in q] for m, q in plain._ready.items()}
    # every check but the collisions is still made, naming the item
    with pytest.raises(InputError, match="item 'e': empty text"):
        unique.add_page(["x1", "e"], ["fine", " "], unique=True)
    with pytest.raises(InputError, match="item 'a b': id must match"):
        unique.add_page(["x2", "a b"], ["fine", "text"], unique=True)
    with pytest.raises(InputError, match=r"item 'big': needs .* tokens alone"):
        unique.add_page(["big"], ["word " * 50_000], unique=True)


def test_pages_with_and_without_repeated_texts_lead_and_queue_as_items_do() -> None:
    # a page whose texts repeat none (within it or waiting) takes the page-at-a-time path;
    # one with a repeat the item loop: leaders, followers and queues as add_items makes them
    rng = random.Random(3)
    words = ["alpha", "Beta", "gamma", "DELTA", "eps"]
    by_items = Engine(task(), config(), random.Random(1))
    by_page = Engine(task(), config(), random.Random(1))
    start = 1
    for size in (30, 1, 40, 25, 2):
        ids = [str(n) for n in range(start, start + size)]
        start += size
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
                 for _ in ids] if size != 40 else [f"unique text {i}" for i in ids]
        by_items.add_items(map(Item, ids, texts))
        by_page.add_page(ids, texts)
        assert by_page._leaders == by_items._leaders
        assert list(by_page._leaders) == list(by_items._leaders)
        assert by_page._followers == by_items._followers
        assert {m: [st.id for st in q] for m, q in by_page._ready.items()} == {
            m: [st.id for st in q] for m, q in by_items._ready.items()}
    assert by_page._followers and by_page.counts.fed == by_items.counts.fed == start - 1


def test_check_page_names_the_first_unusable_item_and_records_nothing() -> None:
    engine = Engine(task(), config(), random.Random(1))
    engine.check_page(["1", "2"], ["fine", "also fine"])
    assert engine._keys == {}
    with pytest.raises(InputError, match="item 'e': empty text"):
        engine.check_page(["1", "e", "a b"], ["fine", " ", "text"])
    with pytest.raises(InputError, match=r"'007'.*collides"):
        engine.check_page(["7", "007"], ["a", "b"])
    with pytest.raises(InputError, match=r"'big'.*token_budget"):
        engine.check_page(["1", "big"], ["fine", "x" * 70000])
    engine.check_page(["7"], ["a"])  # nothing was kept from the pages before
    assert engine._keys == {}


PRICED = [{"name": "p1", "base_url": "http://fake/v1", "api_key": "k",
           "prices": {"m1": {"input": 1.0, "output": 1.0}}}]


@pytest.mark.parametrize("priced", [True, False], ids=["price table", "charges only"])
def test_a_spend_cap_is_never_passed_by_the_requests_in_flight(priced: bool) -> None:
    """Each request in flight holds its most possible cost (prompt and max_tokens at the
    price table's rates; without one, the largest charge so far): 8 in flight at once
    stop at 5 requests under a USD 0.002 cap, where the charges alone would learn of it
    only after 8 were sent."""
    cfg: dict[str, object] = {"spend_cap_usd": 0.002, "concurrency": {"limit": 8}}
    if priced:
        cfg["providers"] = PRICED
    engine = make(400, **cfg)
    fake = FakeProvider()
    done, _, results = drive(engine, fake)
    assert done.status == EXIT_SPEND_CAP
    assert done.reason.startswith("spend cap USD 0.002 reached: USD 0.001789 spent, and the "
                                  "next request would cost about USD 0.000")
    assert done.reason.endswith("; the items left are pending")
    assert (fake.calls, engine.counts.done, engine.counts.pending) == (5, 100, 300)
    assert engine.cost.total_usd == pytest.approx(0.001789) and len(results) == 100
    # without the cap, the same job
    engine = make(400, concurrency={"limit": 8}, providers=PRICED)
    assert drive(engine, FakeProvider())[0].status == 0 and engine.counts.requests == 20


def test_without_a_price_the_first_request_under_a_cap_goes_alone() -> None:
    engine = make(400, spend_cap_usd=1.0, concurrency={"limit": 8})
    assert isinstance(engine.next_action(0.0), Send)
    assert isinstance(engine.next_action(0.0), Wait)  # what a request costs is not known
    priced = make(400, spend_cap_usd=1.0, concurrency={"limit": 8}, providers=PRICED)
    assert isinstance(priced.next_action(0.0), Send)
    assert isinstance(priced.next_action(0.0), Send)


def test_json_mode_asks_for_an_object_and_makes_room_for_it() -> None:
    plain, asked = make(20), make(20, batch={"json_mode": True})
    sent = [engine.next_action(0.0) for engine in (plain, asked)]
    assert isinstance(sent[0], Send) and isinstance(sent[1], Send)
    assert "response_format" not in sent[0].call.body
    assert sent[1].call.body["response_format"] == {"type": "json_object"}
    assert sent[1].call.max_tokens == sent[0].call.max_tokens + 6
    # OpenAI refuses JSON mode unless the messages say JSON: refused before any request
    with pytest.raises(InputError, match=r"batch\.json_mode: .* must say JSON"):
        Engine(task(instructions="Classify each line."), config(batch={"json_mode": True}),
               random.Random(1))


def test_json_schema_asks_for_the_answers_schema_and_counts_its_text() -> None:
    plain, held = make(20), make(20, batch={"json_schema": True})
    sent = [engine.next_action(0.0) for engine in (plain, held)]
    assert isinstance(sent[0], Send) and isinstance(sent[1], Send)
    fmt = sent[1].call.body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    answer = schema["properties"]["results"]["items"]
    assert answer["properties"]["c"]["enum"] == list(task().labels)
    assert answer["required"] == ["id", "c"] and answer["additionalProperties"] is False
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    # the prompt counts the schema as the provider bills it; the reply gets the object's room
    assert sent[1].call.prompt_tokens == sent[0].call.prompt_tokens + text_tokens(text)
    assert sent[1].call.max_tokens == sent[0].call.max_tokens + 6
    # no "JSON" needed in the prompt, unlike JSON mode
    Engine(task(instructions="Classify each line."), config(batch={"json_schema": True}),
           random.Random(1))


def _lockstep(engines: list[Engine], fake: FakeProvider, budget: SpendBudget | None,
              answers: list[str] | None = None) -> tuple[list[Done | None], float]:
    """Drive engines on one virtual clock (each call answered 0.5 s after it is sent) until
    each has stopped or idles; the most ever spent plus held (USD) against ``budget``.
    ``answers`` gets each chat's verdict and reason."""
    now, inflight, done = 0.0, [], [None] * len(engines)  # type: ignore[var-annotated]
    peak = 0.0

    def answered(engine: Engine) -> None:
        engine.drain()
        for _, (_, verdict) in engine.drain_interactive():
            if answers is not None:
                answers.append(f"{verdict.verdict.value}: {verdict.reason}")

    for _ in range(100_000):
        waits = []
        for i, engine in enumerate(engines):
            while done[i] is None:
                action = engine.next_action(now)
                if isinstance(action, Send):
                    inflight.append((now + 0.5, i, action.call))
                    continue
                if isinstance(action, Done):
                    done[i] = action if action.status else None
                    if not action.status:
                        break  # idle: nothing queued
                elif action.seconds is not None:
                    waits.append(now + action.seconds)
                break
        if budget is not None:
            peak = max(peak, budget.committed_usd)
        if not inflight and not waits:
            for engine in engines:
                answered(engine)  # a stop answers the chats still queued
            return done, peak
        now = min([t for t, _, _ in inflight] + waits)
        for t, i, call in [x for x in inflight if x[0] <= now]:
            inflight.remove((t, i, call))
            engines[i].on_response(now, call, fake(call))
            answered(engines[i])
    raise AssertionError("engines did not settle")


def test_a_batch_job_and_chats_share_one_spend_cap() -> None:
    """A process's batch job and its chats hold their requests against one budget: the
    two together never pass it, and each stops when its next request could."""
    cap = 0.004
    prompt = [{"role": "user", "content": "x" * 400}]  # ~103 prompt tokens, 200 max_tokens

    def engines(shared: bool) -> tuple[list[Engine], SpendBudget | None]:
        budget = SpendBudget(cap) if shared else None
        batch = Engine(task(), config(providers=PRICED, concurrency={"limit": 8},
                                      **({} if shared else {"spend_cap_usd": cap})),
                       random.Random(1), spend=budget)
        batch.add_items(items(400))
        batch.end_of_items()
        chat = Engine(task(), config(providers=PRICED, concurrency={"limit": 4}),
                      random.Random(2), spend=budget)
        chat.end_of_items()
        for n in range(30):
            chat.submit_interactive(0.0, f"u{n}", prompt, 200)
        return [batch, chat], budget

    fake = FakeProvider()
    pair, budget = engines(shared=True)
    answers: list[str] = []
    (batch_done, chat_done), peak = _lockstep(pair, fake, budget, answers)
    assert budget is not None and budget.spent_usd <= cap and peak <= cap + 1e-12
    assert batch_done is not None and batch_done.status == EXIT_SPEND_CAP
    assert chat_done is not None and chat_done.status == EXIT_SPEND_CAP
    assert chat_done.reason.endswith("; the chats left are not sent")
    assert pair[0].cost.total_usd + pair[1].cost.total_usd == pytest.approx(budget.spent_usd)
    assert pair[1].counts.requests == 3  # the chats had their share before the cap
    # every chat is answered: those sent by the provider, the rest with the cap's reason
    assert answers[:3] == ["ok: ok"] * 3
    assert answers[3:] == [f"never_retry: {chat_done.reason}"] * 27
    # each with a cap of its own (the batch's) and the chats uncapped, as before: passed
    apart, _ = engines(shared=False)
    _lockstep(apart, FakeProvider(), None)
    assert apart[0].cost.total_usd + apart[1].cost.total_usd > cap


def test_a_job_paused_by_retry_after_says_for_how_long() -> None:
    # two providers: one waiting out a 429 does not pause the job; both do, until the first
    # of them may be sent to again
    engine = make(100, providers=[
        {"name": "p1", "base_url": "http://fake/v1", "api_key": "k", "failover_on_429": True},
        {"name": "p2", "base_url": "http://fake2/v1", "api_key": "k"}])
    refused = json.dumps({"error": {"type": "tokens", "code": "rate_limit_exceeded",
                                    "message": "Rate limit reached"}})
    first = engine.next_action(0.0)
    assert isinstance(first, Send) and first.call.provider == "p1"
    assert engine.paused_for(0.0) == 0.0
    engine.on_response(0.5, first.call, Response(429, {"retry-after": "3600"}, refused))
    assert engine.paused_for(0.5) == 0.0  # p2 may still be sent to
    second = engine.next_action(0.5)
    assert isinstance(second, Send) and second.call.provider == "p2"
    engine.on_response(1.0, second.call, Response(429, {"retry-after": "120"}, refused))
    assert 119.0 <= engine.paused_for(1.0) <= 120.0 + 1.0  # p2's wait, a little jitter on it
    assert engine.paused_for(10_000.0) == 0.0
