"""The asyncio runner over a FunctionTransport, a real SQLite store and result cache."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from batchclient.cache import SqliteResultCache
from batchclient.clock import ScaledClock
from batchclient.events import Event
from batchclient.policy.engine import EXIT_BALANCE, InputError
from batchclient.policy.userlimits import Tier, UserDecision, UserLimits
from batchclient.policy.wire import Item, Response
from batchclient.runner import Runner
from batchclient.store import SqliteJobStore
from batchclient.transport import FunctionTransport
from tests.batchclient.bc_fakes import FakeProvider, code_of, config, items, task


def runner(tmp_path: Path, fake: object, n: int = 100, name: str = "job", **kw: object) -> Runner:
    store = SqliteJobStore(str(tmp_path / f"{name}.sqlite"))
    if n:
        store.import_items(items(n))
    cfg = config(time_scale=1000.0)
    return Runner(task(), cfg, FunctionTransport(fake, {"p1": {"m1"}}), store,  # type: ignore[arg-type]
                  clock=ScaledClock(1000.0), **kw)  # type: ignore[arg-type]


async def test_run_writes_every_result_once(tmp_path: Path) -> None:
    events: list[Event] = []
    r = runner(tmp_path, FakeProvider(seed=1, faults={"drop": 0.05, "repeat": 0.05}),
               on_event=events.append)
    result = await r.run()
    assert (result.exit_status, result.done, result.dead, result.pending) == (0, 100, 0, 0)
    stored = r.store.results()  # type: ignore[attr-defined]
    for i in range(1, 101):
        assert stored[str(i)] == ("done", code_of(f"product number {i} with words"), None)
    requests = [e for e in events if e.kind == "request"]
    assert len(requests) == result.requests
    assert sum(e.kind == "item" for e in events) == 100
    assert result.cost_usd == pytest.approx(sum(e.cost_usd for e in requests))
    # the store's record of each reply's charge and each code's label adds up the same
    assert r.store.counts().cost_usd == pytest.approx(result.cost_usd)
    with sqlite3.connect(tmp_path / "job.sqlite") as conn:
        rows = conn.execute("SELECT result, label, model, provider FROM item_results").fetchall()
    assert len(rows) == 100 and all(
        label == f"label {code}" and (model, provider) == ("m1", "p1")
        for code, label, model, provider in rows)


async def test_402_stops_then_resume_completes(tmp_path: Path) -> None:
    fake = FakeProvider(script={3: 402})
    r = runner(tmp_path, fake)
    result = await r.run()
    assert result.exit_status == EXIT_BALANCE
    assert result.done + result.pending == 100 and result.pending > 0
    resumed = Runner(r.task, r.config, FunctionTransport(fake), r.store,
                     clock=ScaledClock(1000.0))
    again = await resumed.run()
    assert (again.exit_status, again.done, again.pending) == (0, 100, 0)
    assert again.requests == -(-result.pending // 20)


async def test_cache_answers_duplicates_across_jobs(tmp_path: Path) -> None:
    cache = SqliteResultCache(str(tmp_path / "cache.sqlite"))
    fake = FakeProvider()
    first = await runner(tmp_path, fake, name="a", cache=cache).run()
    assert first.requests == 5
    second = await runner(tmp_path, fake, name="b", cache=cache).run()
    assert (second.done, second.requests, second.cached) == (100, 0, 100)


async def test_preflight_refuses_unserved_model_and_empty_jobs(tmp_path: Path) -> None:
    r = runner(tmp_path, FakeProvider())
    r.task = replace(r.task, model="nope")
    with pytest.raises(InputError, match=r"task\.model: model 'nope' is not served"):
        await r.run()
    empty = runner(tmp_path, FakeProvider(), n=0, name="empty")
    with pytest.raises(InputError, match="no items"):
        await empty.run()
    assert r.transport.calls == []  # type: ignore[attr-defined]


async def test_preflight_refuses_a_store_whose_import_did_not_finish(tmp_path: Path) -> None:
    """A library caller resuming a store whose import was cut short would run part of the
    job as the whole: refused before any request, as ``ratelab job`` refuses it."""
    r = runner(tmp_path, FakeProvider(), n=0)

    def cut_short() -> Iterator[Item]:
        yield from items(5)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        r.store.import_items(cut_short())
    with pytest.raises(InputError, match="the import of the job's items did not finish"):
        await r.run()
    assert r.transport.calls == []  # type: ignore[attr-defined]
    r.store.import_items(items(8))   # imported again: complete, and the job runs
    assert (await r.run()).done == 8


async def test_preflight_refuses_an_item_over_the_budget_before_any_request(
        tmp_path: Path) -> None:
    r = runner(tmp_path, FakeProvider())
    r.store.import_items([Item("huge", "word " * 20000)])
    with pytest.raises(InputError, match="'huge'"):
        await r.run()
    assert r.transport.calls == []  # type: ignore[attr-defined]


async def test_interactive_lane_and_user_limits(tmp_path: Path) -> None:
    def answer(call):  # type: ignore[no-untyped-def]
        if call.lane == "interactive":
            body = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
            return Response(200, {}, json.dumps(body))
        return FakeProvider()(call)

    limits = UserLimits({"free": Tier(rpm=1, tokens_per_day=1000)})
    r = runner(tmp_path, answer, n=0, keep_open=True, user_limits=limits)
    import asyncio

    job = asyncio.ensure_future(r.run())
    out = await r.chat("alice", [{"role": "user", "content": "hello"}], 8)
    assert not isinstance(out, UserDecision)
    assert out[0].status == 200
    refused = await r.chat("alice", [{"role": "user", "content": "again"}], 8)
    assert isinstance(refused, UserDecision) and "requests per minute" in refused.reason
    r.stop()
    result = await job
    assert result.exit_status == 130 and result.requests == 1


async def test_tagged_items_are_routed_by_their_tag_from_the_store(tmp_path: Path) -> None:
    # A page with tags goes to the engine item by item (a routing rule may read the tag);
    # an untagged page goes as columns. Both kinds in one job, across pages.
    store = SqliteJobStore(str(tmp_path / "tags.sqlite"))
    plain = items(30)
    tagged = [Item(f"t{i}", f"photo number {i} with words", tag="img") for i in range(1, 11)]
    store.import_items(plain + tagged)
    cfg = config(time_scale=1000.0, page_size=16,
                 routing=[{"model": "m2", "tag": "img"}])
    transport = FunctionTransport(FakeProvider(seed=3), {"p1": {"m1", "m2"}})
    r = Runner(task(), cfg, transport, store, clock=ScaledClock(1000.0))
    result = await r.run()
    assert (result.exit_status, result.done, result.pending) == (0, 40, 0)
    models = {item_id: call.model for call in transport.calls for item_id in call.item_ids}
    assert models == {**{i.id: "m1" for i in plain}, **{i.id: "m2" for i in tagged}}
    stored = store.results()
    assert all(stored[i.id] == ("done", code_of(i.text), None) for i in plain + tagged)
